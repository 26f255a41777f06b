"""Turns an ImageNet recipe into its CIFAR-10 variant (32x32; stride-1 stem keeps spatial
detail; learning rates scaled linearly from the recipe's batch to 256)."""


def to_cifar10(c):
  scale = 256 / c.batch_size
  c.model_options.num_classes = 10
  c.model_options.stem_stride = 1
  c.dataset, c.test_split = "cifar10", "test"
  c.train_split, c.holdout = "train[:-5000]", 5000  # 10% of the 50k held out for search
  c.resolution, c.train_resolutions, c.augment = 32, (), "cifar"
  c.batch_size = 256
  c.eval.calib_batch_size = 128
  for phase in c.phases:  # a phase's rate may reference c.learning_rate: scale it once
    phase.learning_rate = phase.learning_rate * scale
  return c
