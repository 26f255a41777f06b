"""The OFA MobileNetV3 ImageNet recipe on CIFAR-10 (``:teacher`` for the full net first)."""

from configs import ofa_mbv3_imagenet
from configs.cifar10 import to_cifar10


def get_config(arg: str = ""):
  return to_cifar10(ofa_mbv3_imagenet.get_config(arg))
