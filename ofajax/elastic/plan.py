"""The static description of an elasticized model, and the small helpers both of its runners
(the masked supernet and the dense twin) share.

A *label* describes a value's channel (last) axis as segments ``((group, size), ...)``: one
segment for a conv's output, several side by side after a concatenation, repeated after a
flatten. A group's active width keeps the first channels of each of its segments.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ofajax.models.base import InputSpec

NET = "net"   # the user's module's name inside the supernet (and its variables' top key)
TRANSFORMS = "kernel_transforms"   # params beside NET: OFA's kernel transforms, if enabled


class ElasticizeError(ValueError):
  """A model (or the choices for it) that ofajax cannot make elastic, with what to do instead."""


Label = tuple  # ((group, size), ...): the groups along a value's last axis, in order


class Layer(NamedTuple):
  """One supported layer of the user's model, as traced (static, hashable)."""
  path: tuple[str, ...]       # the module path inside the user's model
  kind: str                   # "conv", "conv_transpose", "dense", "batch_norm"
  in_label: Label             # groups over its input channels
  out_label: Label            # groups over its output channels
  depthwise: bool             # a conv with one kernel per input channel (groups == channels)
  kernel_size: tuple[int, ...]
  groups: int                 # feature_group_count (1 for dense / transpose)
  use_bias: bool
  use_scale: bool             # BatchNorm only
  out_positions: int          # output positions per example (H*W, or tokens) at trace time
  blocks: tuple[int, ...]     # indices of the skippable blocks it sits in
  croppable: bool = False     # a conv whose odd square kernel (> 3) may be centre-cropped


class Group(NamedTuple):
  size: int
  producers: tuple[str, ...]  # layer paths whose outputs are this group ("input" / "output")
  fixed_by: str               # why it is not elastic ("" when it is)


class Plan(NamedTuple):
  """Everything static the supernet needs: layers, groups, skippable blocks."""
  layers: tuple[Layer, ...]
  groups: tuple[Group, ...]
  blocks: tuple[tuple[str, ...], ...]   # skippable block paths, in call order
  input_channels: int
  num_classes: int


def path_text(path: Sequence[str]) -> str:
  return "/".join(path) or "<model>"


# --------------------------------------------------------------------------- labels


def label_width(label, widths):
  """Active channels of a label (a sum over its segments' groups)."""
  return sum(widths[g] for g, _ in label)


def label_mask(label, widths) -> jax.Array:
  """[C] float mask: 1 on each segment's first ``widths[group]`` channels."""
  return jnp.concatenate([(jnp.arange(size) < widths[g]).astype(jnp.float32)
                          for g, size in label])


def label_index(label, widths) -> np.ndarray:
  """The positions a dense subnet keeps along a label: each segment's active prefix."""
  out, offset = [], 0
  for g, size in label:
    out.append(offset + np.arange(int(widths[g])))
    offset += size
  return np.concatenate(out).astype(np.int64)


# --------------------------------------------------------------------------- running the user's module


def call_kwargs(train_arg: str, train: bool) -> dict:
  """How the user's module hears the train flag: ``"train"`` -> train=..., ``"!deterministic"``
  -> deterministic=not train, ``""`` -> nothing."""
  if not train_arg:
    return {}
  if train_arg.startswith("!"):
    return {train_arg[1:]: not train}
  return {train_arg: train}


def relative_path(module) -> tuple[str, ...] | None:
  """The module's path inside the user's model, None for anything outside it (the supernet
  itself, or a layer clone run on its own)."""
  if module.scope is None:
    return None
  path = tuple(str(p) for p in module.scope.path)
  return path[1:] if path[:1] == (NET,) else None


def run_clone(module, fields: dict, args, kwargs):
  """``module`` called as a clone with ``fields`` changed, on the variables it holds (sliced to
  the clone's shapes by the caller); at init, the clone's variables are created in place."""
  clone = module.clone(parent=None, **fields)
  if module.is_initializing():
    y, variables = clone.init_with_output({"params": module.make_rng("params")}, *args, **kwargs)
    for collection, tree in variables.items():
      for name, value in tree.items():
        module.put_variable(collection, name, value)
    return y
  return clone.apply(dict(module.variables), *args, **kwargs)


def input_spec_of(shape, dtype) -> InputSpec:
  if jnp.issubdtype(jnp.dtype(dtype), jnp.integer) and len(shape) == 2:
    return InputSpec("tokens", vocab_size=0)
  if len(shape) == 4:
    return InputSpec("image", channels=int(shape[-1]))
  raise ElasticizeError(f"sample_input has shape {tuple(shape)}; elasticize takes NHWC images "
                        "[B, H, W, C] (or int token ids [B, T])")
