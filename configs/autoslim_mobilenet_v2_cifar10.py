"""The autoslim_mobilenet_v2 ImageNet recipe on CIFAR-10."""

from configs import autoslim_mobilenet_v2_imagenet
from configs.cifar10 import to_cifar10


def get_config():
  return to_cifar10(autoslim_mobilenet_v2_imagenet.get_config())
