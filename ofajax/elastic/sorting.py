"""Importance sorting of an elasticized model's channel groups, before elastic training.

A subnet keeps a prefix of every group, so the prefix should hold the channels that matter.
As Once-for-All ranks a block's middle channels by the L1 norm of the weights that read them
(``re_organize_middle_weights``), a group's channels are ranked by the L1 norm of every
consuming conv / dense layer's input rows for that group, summed over those layers, descending
(stable). The permutation moves every array indexed by the group: the producers' kernel
outputs and biases, BatchNorm vectors and statistics, depthwise kernels, and the consumers'
kernel inputs (also where the group is one segment of a concatenation, or repeated by a
flatten). The full network computes the same function afterwards.

``rank_by="filters"`` ranks by the producers' own weights instead (the L1 norm of each output
filter, summed over the group's producing convs / dense layers): the criterion of magnitude
filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017), used by
``bench/bench_elasticize.py`` as the baseline. ``rank_by="bn_scale"`` ranks by |gamma| of the
BatchNorms over the group's channels, summed (Network Slimming, Liu et al., ICCV 2017); a group
that no scaled BatchNorm normalises has no such ranking and is refused by name.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ofajax.channel_sorting import Move, descending_order, l1_importance, permute
from ofajax.elastic.plan import NET
from ofajax.elastic.supernet import ElasticNet


def _offsets(label, group: int) -> list[int]:
  """Where ``group``'s segments start along a label."""
  out, offset = [], 0
  for g, size in label:
    if g == group:
      out.append(offset)
    offset += size
  return out


def _reads(layer) -> bool:
  """Whether the layer mixes its input channels through a kernel (so it ranks them)."""
  return layer.kind in ("conv", "conv_transpose", "dense") and not layer.depthwise


RANKINGS = ("consumers", "filters", "bn_scale")


def group_importance(model: ElasticNet, params: Mapping, group: int, rank_by: str) -> np.ndarray:
  """[channels] importance of one group's channels (see the module docstring)."""
  if rank_by not in RANKINGS:
    raise ValueError(f"rank_by must be one of {RANKINGS}, got {rank_by!r}")
  if rank_by == "bn_scale":
    return _bn_scale_importance(model, params, group)
  size = model.plan().groups[group].size
  importance = np.zeros(size, np.float32)
  for layer in model.plan().layers:
    if not _reads(layer):
      continue
    label, axis = (layer.in_label, -2) if rank_by == "consumers" else (layer.out_label, -1)
    l1 = l1_importance(_at(params, layer.path)["kernel"], axis)
    for o in _offsets(label, group):
      importance += l1[o:o + size]
  return importance


def _bn_scale_importance(model: ElasticNet, params: Mapping, group: int) -> np.ndarray:
  """[channels] |gamma| of every scaled BatchNorm over the group, summed (where a residual add
  merged several producers, each one's BatchNorm counts)."""
  plan = model.plan()
  size = plan.groups[group].size
  importance, found = np.zeros(size, np.float32), False
  for layer in plan.layers:
    if layer.kind != "batch_norm" or not layer.use_scale:
      continue
    scale = np.abs(np.asarray(_at(params, layer.path)["scale"], np.float32))
    for o in _offsets(layer.out_label, group):
      importance += scale[o:o + size]
      found = True
  if not found:
    raise ValueError(
        f"rank_by='bn_scale': the channel group of {', '.join(plan.groups[group].producers)} "
        f"({size} channels) is not normalised by a BatchNorm with a scale, so it has no "
        "|gamma| to rank by; use rank_by='filters' (L1 of the filters) for this model")
  return importance


def channel_orders(model: ElasticNet, variables: Mapping, rank_by: str = "consumers"
                   ) -> list[Move]:
  """One Move per (layer, axis) that a sorted group touches; apply with ``permute``."""
  plan = model.plan()
  params = variables["params"][NET]
  moves = []
  for g in model.elastic_groups():
    order = descending_order(group_importance(model, params, g, rank_by))
    for layer in plan.layers:
      width = sum(s for _, s in layer.out_label)
      sites = [((NET,) + layer.path + (name,), -1) for name in _vectors(layer)]
      if _offsets(layer.out_label, g):
        moves.append(Move(_spread(order, _offsets(layer.out_label, g), width), tuple(sites)))
      if _reads(layer) and _offsets(layer.in_label, g):
        width_in = sum(s for _, s in layer.in_label)
        moves.append(Move(_spread(order, _offsets(layer.in_label, g), width_in),
                          (((NET,) + layer.path + ("kernel",), -2),)))
  return moves


def _vectors(layer) -> tuple[str, ...]:
  """The arrays of a layer indexed by its output channels on their last axis."""
  if layer.kind == "batch_norm":
    return ("scale", "bias", "mean", "var")
  return ("kernel", "bias")


def _spread(order: np.ndarray, offsets: list[int], width: int) -> np.ndarray:
  """A whole-axis order that applies ``order`` at every offset and keeps the rest in place."""
  full = np.arange(width)
  for o in offsets:
    full[o:o + order.size] = o + order
  return full


def _at(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def sort_channels(model: ElasticNet, variables: Mapping, rank_by: str = "consumers") -> dict:
  """``variables`` with every elastic group's channels in descending importance."""
  moves = channel_orders(model, variables, rank_by)
  return {name: permute(_leaves_only(tree), moves) for name, tree in variables.items()}


def _leaves_only(tree):
  return {k: _leaves_only(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree
