"""AutoSlim MobileNetV2 on ImageNet (Yu & Huang, 2019): a 1.5x slimmable MobileNetV2 (head
1920) trained as a one-shot model with every layer's width sampled independently, then slimmed
greedily by ``search.py`` (``configs/search/autoslim.py``) on 50,000 held-out training images;
the found archs are then trained from scratch.

Follows JiahuiYu/slimmable_networks (commit 5dc14d0) and the AutoSlim paper (sec. 3-4):
- the supernet is MobileNetV2 at width 1.5: the channel lists of the found nets
  (``apps/autoslim_mobilenet_v2_train_val.yml`` lines 58-60) end in a 1920-wide head;
- ``train.py`` lines 116-121: with ``autoslim`` the first 50,000 training images are held out
  and the search (``slimming``, lines 556-600) scores on them; the greedy step removes one
  channel step from the layer whose removal hurts least;
- the one-shot model is trained with the sandwich rule and in-place distillation for about 10%
  of a full schedule (the paper); otherwise the recipe is US-Nets' (us_mobilenet_v2_imagenet.py).

Deviations and choices: widths are sampled per group (AutoSlim slims every layer on its own),
down to 0.15 of the 1.5x widths (ofajax's choice: AutoSlim removes steps until a layer would be
empty); the held-out images are the last 50,000, not the first.
"""

from configs import us_mobilenet_v2_imagenet


def get_config():
  c = us_mobilenet_v2_imagenet.get_config()
  c.model_options.width_mult = 1.5              # head 1920
  c.model_options.slim_head = True              # AutoSlim slims the head too
  c.model_options.min_width_ratio = 0.15        # down to ~0.225x of MobileNetV2's widths
  c.train_split, c.holdout = "train[:-50000]", 50000   # AutoSlim: 50k held out for search
  c.phases[0].uniform = []                      # every group's width on its own
  c.num_epochs = 25.0                           # ~10% of the 250-epoch schedule
  return c
