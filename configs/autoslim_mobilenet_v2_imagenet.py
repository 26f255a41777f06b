"""AutoSlim MobileNetV2 on ImageNet (Yu & Huang, 2019): a non-uniform slimmable supernet trained
briefly (AutoSlim trains the one-shot model for about 10% of a full schedule) before greedy
slimming with search.py; the found archs are then trained from scratch."""

from configs import us_mobilenet_v2_imagenet


def get_config():
  c = us_mobilenet_v2_imagenet.get_config()
  c.num_epochs = 50.0
  return c
