"""The compofa_mbv3 ImageNet recipe on CIFAR-10."""

from configs import compofa_mbv3_imagenet
from configs.cifar10 import to_cifar10


def get_config():
  return to_cifar10(compofa_mbv3_imagenet.get_config())
