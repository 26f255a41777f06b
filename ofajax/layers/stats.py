"""Slicing BatchNorm statistics to match sliced parameters.

Every BatchNorm of a supernet holds ``{"scale", "bias"}`` in "params" and ``{"mean", "var"}`` at
the same path in "batch_stats", all [C] vectors over the same channels, and a subnet keeps a
prefix of them. So once a model has sliced its params, its statistics follow mechanically: each
BatchNorm keeps as many statistics as its scale kept, and a module the sliced params dropped (a
block that depth skips) loses its statistics too. Models slice their params only, then call
:func:`with_stats`, instead of writing the statistics tree a second time by hand.
"""

from __future__ import annotations

from typing import Mapping


def slice_bn(tree: Mapping, active: int) -> dict:
  """A BatchNorm's ``{"scale", "bias"}`` or ``{"mean", "var"}`` cut to the first ``active``
  channels."""
  return {k: v[:active] for k, v in tree.items()}


def slice_stats(batch_stats: Mapping, params: Mapping) -> dict:
  """``batch_stats`` cut to the widths of ``params``, a sliced copy of the same model's params."""
  scale = params.get("scale")
  if scale is not None and not isinstance(scale, Mapping):   # params of one BatchNorm
    return slice_bn(batch_stats, scale.shape[0])
  return {name: slice_stats(sub, params[name]) for name, sub in batch_stats.items()
          if name in params}


def with_stats(variables: Mapping, params: dict) -> dict:
  """``{"params": params, "batch_stats": ...}``: the dense subnet's variables, given its sliced
  ``params`` and the supernet's ``variables``."""
  return {"params": params, "batch_stats": slice_stats(variables.get("batch_stats", {}), params)}
