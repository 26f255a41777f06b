"""The ofa_mbv3 ImageNet recipe on CIFAR-10 (32x32; stride-1 stem keeps spatial detail)."""

from configs import ofa_mbv3_imagenet


def get_config(arg: str = ""):
  c = ofa_mbv3_imagenet.get_config(*([arg] if arg else []))
  c.model_options.num_classes = 10
  c.model_options.stem_stride = 1
  c.dataset, c.train_split, c.test_split = "cifar10", "train", "test"
  c.resolution, c.train_resolutions, c.augment = 32, (), "cifar"
  c.batch_size = 256
  c.eval.calib_batch_size = 128
  for phase in c.phases:
    phase.learning_rate = phase.learning_rate * 256 / 2048
  return c
