"""Greedy slimming (AutoSlim) to three MACs targets.

On a slimmable supernet each move narrows one channel group (residual-tied layers are one group)
by one bin of 8 channels. On an OFA space a move shrinks one stage's depth, or every block's
kernel or expand ratio of one stage (granularity "stage"; "layer" moves one block at a time,
~4x more candidates per round).
"""

import ml_collections

from configs.search.common import base_config


def get_config():
  c = base_config("autoslim", "greedy")
  c.greedy = ml_collections.ConfigDict({"granularity": "stage", "bin_steps": 1})
  return c
