"""The smallest supernet that exercises the scale-out tests, as a train.py config file:

    python train.py --config tests/tiny_dist_config.py --config.data_dir=<dir with digits>

Digits 8x8, batch 32, one elastic stage (one block, expand ratio 2 or 3) between the stem and
the head, sandwich rule with in-place distillation over 2 subnets. These tests are about devices
and processes, not the search space, and XLA:CPU compile time decides their cost: this train
step compiles in about 5 s on 2 cores, test_train.tiny_config's (5 stages, depth gating, 5x5
kernels, SE) in about 30 s.
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.model = "ofa_mbv3_tiny"
  c.model_options = ml_collections.ConfigDict({
      "num_classes": 10, "base_widths": (8, 8, 16, 32, 32), "strides": (1, 2),
      "acts": ("relu", "relu"), "use_se": (False, False), "depth_choices": (1,),
      "kernel_choices": (3,), "expand_choices": (2, 3)})
  c.dataset, c.resolution, c.augment = "digits", 8, "none"
  c.train_split, c.holdout = "train[:-200]", 200  # as test_train.tiny_config
  c.execution = "masked"  # compiles ~3x faster; execution has its own tests
  c.batch_size = 32
  c.num_epochs = 200 / 38  # 200 steps (38 per epoch); tests stop earlier with stop_after_steps
  c.phases[0].warmup_epochs = 0.0
  c.phases[0].num_subnets = 2
  c.learning_rate = 0.1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 10
  c.eval.num_random_subnets = 1
  c.eval.calib_batches = 1
  c.eval.calib_batch_size = 32
  c.eval.batch_size = 120
  return c
