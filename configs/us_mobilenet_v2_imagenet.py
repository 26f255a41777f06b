"""US-Nets MobileNetV2 on ImageNet (Yu & Huang, ICCV 2019): one width multiplier for the whole
network per subnet, sandwich rule with n=4 (largest 1.0x, smallest 0.35x, 2 random multipliers),
in-place distillation from the largest, BN re-calibrated per subnet after training.

Follows JiahuiYu/slimmable_networks (commit 5dc14d0):
- ``apps/us_mobilenet_v2_train_val.yml``: SGD momentum 0.9 Nesterov, weight decay 1e-4 (line
  24), width range [0.35, 1.0] (line 64), batch 1024, lr 0.5, linear decay to 0, 250 epochs
  (lines 67-70), 4 widths per step and soft targets (lines 54-56), no warmup, no label
  smoothing (neither is set);
- ``train.py`` lines 249-263: weight decay only on regular convs and fully connected weights,
  not on depthwise convs, BN or biases; lines 431-450: the sandwich rule with one multiplier
  for every layer (``random.uniform(min_width, max_width)``);
- ``models/us_mobilenet_v2.py`` lines 77-78 and 114-121: the 1x1 head conv and the classifier
  stay at 1280 for every width (only the head's input is slimmed); no dropout.

Deviations: a random multiplier is drawn from a grid of 64 between 0.35 and 1 rather than
continuously, and each layer's width is the allowed multiple of 8 nearest to multiplier x its
full width (US-Nets' ``make_divisible``, within 8 channels of it).
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.model = "slim_mobilenet_v2"
  c.model_options = ml_collections.ConfigDict({"num_classes": 1000, "min_width_ratio": 0.35,
                                                "slim_head": False, "dropout_rate": 0.0})
  c.dataset, c.test_split = "imagenet2012", "validation"
  c.train_split, c.holdout = "train[:-10000]", 10000
  c.resolution, c.augment, c.batch_size = 224, "imagenet", 1024
  c.learning_rate, c.weight_decay, c.label_smoothing = 0.5, 1e-4, 0.0
  c.lr_schedule = "linear"
  c.decay_depthwise = False
  c.num_epochs = 250.0
  c.phases[0].warmup_epochs = 0.0
  c.phases[0].num_subnets = 4                     # US-Nets' sandwich rule: n = 4
  c.phases[0].uniform = ["width"]                 # one multiplier for every layer
  c.distill = "inplace"
  c.eval.calib_batches, c.eval.calib_batch_size = 20, 100
  c.checkpoint_every_steps, c.log_every_steps = 2000, 100
  return c
