"""US-Nets MobileNetV2 on ImageNet (Yu & Huang, ICCV 2019): sandwich rule with n=4 (largest,
smallest, 2 random widths), in-place distillation from the largest, widths 0.35x..1.0x, shared
BN re-calibrated per subnet after training. Their recipe: 250 epochs, SGD 0.9, lr 0.5 for batch
1024 linearly scaled, cosine, weight decay 4e-5, label smoothing 0.1."""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.model = "slim_mobilenet_v2"
  c.model_options = ml_collections.ConfigDict({"num_classes": 1000, "min_width_ratio": 0.35})
  c.dataset, c.train_split, c.test_split = "imagenet2012", "train", "validation"
  c.resolution, c.augment, c.batch_size = 224, "imagenet", 1024
  c.learning_rate, c.weight_decay, c.label_smoothing = 0.5, 4e-5, 0.1
  c.num_epochs = 250.0
  c.phases[0].warmup_epochs = 5.0
  c.phases[0].num_subnets = 4                     # US-Nets' sandwich rule: n = 4
  c.distill = "inplace"
  c.eval.calib_batches, c.eval.calib_batch_size = 20, 100
  c.checkpoint_every_steps, c.log_every_steps = 2000, 100
  return c
