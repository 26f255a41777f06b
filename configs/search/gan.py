"""Greedy slimming of a generator supernet (configs/gan_supernet.py) to three MACs budgets.

Each move narrows one channel group of the generator by one width step; the move kept is the
one with the lowest Fréchet distance on the held-out images (``ofajax.gan.search``). The
budgets are fractions of the supernet's largest generator (the stage-2 pruned one).

  python search.py --config configs/search/gan.py --workdir /tmp/gan/supernet
"""

import ml_collections

from configs.search.common import base_config


def get_config():
  c = base_config("gan", "greedy")
  # 0.85 of the pruned generator is about 10x fewer MACs than the original ResNet generator.
  c.target_fractions = (0.85, 0.6, 0.4)
  c.greedy = ml_collections.ConfigDict({"granularity": "layer", "bin_steps": 1})
  return c
