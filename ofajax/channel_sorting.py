"""Channel sorting of CNN supernets, as Once-for-All does before each elastic-expand phase.

A subnet with a smaller expand ratio keeps a *prefix* of each block's middle (expanded)
channels, so OFA re-orders those channels to put the important ones first
(``re_organize_middle_weights`` of ``DynamicMBConvLayer`` and ``DynamicResNetBottleneckBlock``
in mit-han-lab/once-for-all, ``ofa/imagenet_classification/elastic_nn/modules/
dynamic_layers.py``). The importance of a channel is the L1 norm of the weights that *read* it
in the next conv, sorted descending (stable: ties keep their order):

* MBConv (``ofa_mbv3``, ``compofa_mbv3``, ``slim_mobilenet_v2``): the middle channels, by the
  projection conv's input rows; they move in the expand conv's outputs and its BN, the depthwise
  kernel and its BN, SE's reduce inputs and expand outputs, and the projection's inputs. With SE,
  its hidden units are sorted too, by the L1 of SE's expand rows: they move in SE's reduce
  outputs (and bias) and expand inputs. Blocks without an expand conv are left alone: their
  middle channels are the previous layer's outputs (OFA skips its first block too).
* Bottleneck (``ofa_resnet50``): conv2's outputs by conv3's input rows (moving conv3's inputs
  and conv2's outputs and BN), then conv2's inputs by conv2's input slices (moving them and
  conv1's outputs and BN).

BatchNorm statistics move with their scale and bias. OFA's kernel transform matrices act on the
k x k taps and are shared by all channels, so they stay as they are. Only channels inside a
block move, so the full network computes the same function; widths shared through residual
connections (the block outputs) are not touched.

    variables = sort_channels(model, variables)                  # OFA's expand_ratio_stage=0
    variables = sort_channels(model, variables, expand_stage=1)  # keep earlier phases' prefixes
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ofajax.models.ofa_mbv3 import OFAMobileNetV3
from ofajax.models.ofa_resnet50 import OFAResNet50
from ofajax.models.slim_mobilenet_v2 import SlimMobileNetV2

Path = tuple[str, ...]


class Move(NamedTuple):
  """One permutation of a channel axis shared by several arrays of a block."""
  order: np.ndarray                     # new position j holds old index order[j]
  sites: tuple[tuple[Path, int], ...]   # (path to an array or a subtree of arrays, axis)


# Block-relative (path, axis) of every array that holds a sorted axis.
_MBCONV_MID = ((("expand", "kernel"), 3), (("expand", "bn"), 0), (("depthwise", "kernel"), 3),
               (("depthwise_bn",), 0), (("project", "kernel"), 2))
_SE_MID = ((("se", "reduce", "kernel"), 0), (("se", "expand", "kernel"), 1),
           (("se", "expand", "bias"), 0))
_SE_HIDDEN = ((("se", "reduce", "kernel"), 1), (("se", "reduce", "bias"), 0),
              (("se", "expand", "kernel"), 0))
_CONV2_OUT = ((("conv3", "kernel"), 2), (("conv2", "kernel"), 3), (("conv2", "bn"), 0))
_CONV2_IN = ((("conv2", "kernel"), 2), (("conv1", "kernel"), 3), (("conv1", "bn"), 0))


def l1_importance(kernel, axis: int) -> np.ndarray:
  """float32 L1 norm of ``kernel`` over every axis but ``axis`` (on the host: deterministic)."""
  k = np.abs(np.asarray(kernel, np.float32))
  return k.sum(axis=tuple(a for a in range(k.ndim) if a != axis % k.ndim))


def descending_order(importance, bounds: Sequence[int] = ()) -> np.ndarray:
  """Stable descending argsort of ``importance`` within the segments that ``bounds`` cut:
  a channel never crosses a bound (OFA's ``expand_ratio_stage``)."""
  importance = np.asarray(importance, np.float32)
  segment = np.searchsorted(np.sort(np.asarray(bounds, int)), np.arange(importance.size),
                            side="right")
  return np.lexsort((-importance, segment))   # last key first; lexsort is stable


def _take(x, order, axis: int):
  take = np.take if isinstance(x, np.ndarray) else jnp.take
  return take(x, order, axis=axis)


def _permute_at(tree, path: Path, axis: int, order):
  """``tree`` with every array under ``path`` permuted along ``axis``; unchanged where the
  tree lacks ``path`` (batch_stats holds the BatchNorms only)."""
  if not path:
    return jax.tree.map(lambda x: _take(x, order, axis), tree)
  if not isinstance(tree, Mapping) or path[0] not in tree:
    return tree
  return {**tree, path[0]: _permute_at(tree[path[0]], path[1:], axis, order)}


def permute(tree, moves: Sequence[Move]):
  """``tree`` (params, batch_stats, or any tree shaped like them, e.g. optimizer moments) with
  ``moves`` applied; paths it lacks are skipped."""
  for move in moves:
    for path, axis in move.sites:
      tree = _permute_at(tree, path, axis, move.order)
  return tree


def _move(block, name: str, importance, bounds, sites) -> Move:
  """A Move of ``block``'s ``sites``, prefixed with the block's name; a ValueError naming a site
  the block lacks (the variables are not this model's)."""
  for path, _ in sites:
    tree = block
    for key in path:
      if not isinstance(tree, Mapping) or key not in tree:
        raise ValueError(f"params {name!r} lack {'/'.join(path)}; are these this model's "
                         "variables?")
      tree = tree[key]
  return Move(descending_order(importance, bounds), tuple(((name,) + p, a) for p, a in sites))


def _mbconv_moves(block, name: str, bounds) -> list[Move]:
  has_se = "se" in block
  mid = _move(block, name, l1_importance(block["project"]["kernel"], 2), bounds,
              _MBCONV_MID + (_SE_MID if has_se else ()))
  if not has_se:
    return [mid]
  # OFA ranks SE's hidden units after moving the middle channels; doing the same keeps a second
  # sort exactly the identity (the float32 sums see the same arrays).
  expand = permute({"se": block["se"]}, [Move(mid.order, ((("se", "expand", "kernel"), 1),))])
  hidden = _move(block, name, l1_importance(expand["se"]["expand"]["kernel"], 0), (), _SE_HIDDEN)
  return [mid, hidden]


def _bottleneck_moves(block, name: str, bounds) -> list[Move]:
  out = _move(block, name, l1_importance(block["conv3"]["kernel"], 2), bounds, _CONV2_OUT)
  conv2 = _take(block["conv2"]["kernel"], out.order, 3)   # ranked after the first move, as OFA
  return [out, _move(block, name, l1_importance(conv2, 2), bounds, _CONV2_IN)]


class Block(NamedTuple):
  """A block whose middle channels :func:`sort_channels` sorts."""
  name: str                  # its params entry, e.g. "stage0_block1"
  kind: str                  # "mbconv" or "bottleneck"
  widths: tuple[int, ...]    # the middle widths its expand ratios give (OFA's phase bounds)


def sortable_blocks(model) -> list[Block]:
  """The blocks of ``model`` whose middle channels can be sorted; a ValueError if none."""
  # pylint: disable=protected-access  (the models' own static structure, read-only)
  if isinstance(model, OFAMobileNetV3):   # ofa_mbv3 and compofa_mbv3; first_block has no expand
    return [Block(f"stage{s}_block{i}", "mbconv", tuple(mids))
            for s, i, *_, mids in model._stage_blocks()]
  if isinstance(model, OFAResNet50):
    # OFA's phase bounds are the expand ratios at the largest width (``max(out_channel_list)``).
    widest = lambda s: model.mid_table(s)[int(np.argmax(model.stage_widths(s)))]
    return [Block(f"stage{s}_block{i}", "bottleneck", tuple(widest(s)))
            for s, i, *_ in model._blocks()]
  if isinstance(model, SlimMobileNetV2):
    # Only each block's own middle group; the other groups are shared across blocks (residual
    # ties) or with the stem / head, so moving them would need every user to move too.
    return [Block(b.name, "mbconv", ()) for b in model._plan().blocks if b.has_expand]
  raise ValueError(
      f"{type(model).__name__} has no CNN blocks whose middle channels can be sorted "
      "(sort_channels knows OFAMobileNetV3, OFAResNet50 and SlimMobileNetV2); for an elastic "
      "transformer use ofajax.importance.reorder_by_importance")


def _stage_bounds(model, widths: Sequence[int], expand_stage: int) -> list[int]:
  """OFA's ``expand_ratio_stage``: the middle widths of the 2nd..(stage+1)-th largest ratios
  stay bounds, so the prefixes trained in earlier expand phases keep their channels."""
  if expand_stage == 0:
    return []
  descending = sorted(set(widths), reverse=True)
  if len(descending) < 2:
    raise ValueError(f"{type(model).__name__} has no expand phases; use expand_stage=0")
  if not 0 < expand_stage < len(descending):
    raise ValueError(f"expand_stage must be in [0, {len(descending) - 1}] for middle widths "
                     f"{descending}, got {expand_stage}")
  return descending[1:expand_stage + 1]


def channel_orders(model, variables: Mapping, *, expand_stage: int = 0) -> list[Move]:
  """The moves :func:`sort_channels` makes, block by block (apply them with :func:`permute`,
  e.g. to optimizer moments shaped like the params)."""
  params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
  moves = []
  for name, kind, widths in sortable_blocks(model):
    if name not in params:
      raise ValueError(f"variables lack params {name!r} of {type(model).__name__}; are they "
                       "this model's variables?")
    make = _mbconv_moves if kind == "mbconv" else _bottleneck_moves
    moves += make(params[name], name, _stage_bounds(model, widths, expand_stage))
  return moves


def sort_channels(model, variables: Mapping, *, expand_stage: int = 0) -> dict:
  """``variables`` with every block's middle channels in descending L1 importance (OFA's
  ``re_organize_middle_weights(expand_ratio_stage=expand_stage)``); every collection
  (params, batch_stats) moves alike, so the full network's outputs are unchanged.

  ``expand_stage`` > 0 sorts only within the segments the 2nd..(stage+1)-th largest expand
  ratios' middle widths cut (ofa_mbv3 / ofa_resnet50), as OFA does from its second expand phase.
  Optimizer state shaped like the params is not in ``variables``: start it afresh (OFA starts
  each phase with a new optimizer) or move it with ``permute(tree, channel_orders(...))``.
  """
  moves = channel_orders(model, variables, expand_stage=expand_stage)
  return {name: permute(tree, moves) for name, tree in variables.items()}


__all__ = ["Block", "Move", "channel_orders", "descending_order", "l1_importance", "permute",
           "sort_channels", "sortable_blocks"]
