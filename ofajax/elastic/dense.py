"""The dense twin of an elasticized model: the user's module again, with static smaller shapes.

``DenseTwin`` runs the user's module under ``nn.intercept_methods``; each layer whose width (or
kernel) changes runs as a clone of itself with the smaller ``features`` (``kernel_size``), so
Flax's own code keeps every option of the layer; skipped blocks are not called at all. Its
variables are the supernet's, cut by :func:`slice_variables`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ofajax.elastic.channels import layer_kind
from ofajax.elastic.plan import (NET, TRANSFORMS, ElasticizeError, Layer, Plan, call_kwargs,
                                 input_spec_of, label_index, label_width, path_text,
                                 relative_path, run_clone)
from ofajax.layers.cnn import active_depthwise_kernels
from ofajax.models.base import InputSpec

# --------------------------------------------------------------------------- the dense model


def _dense_interceptor(plan: Plan, widths, keep, kernels, called: set):
  """Runs each resized layer as a clone with its smaller width; skips dropped blocks; records
  the layers it ran in ``called``."""
  layers = {layer.path: layer for layer in plan.layers}
  kernel_of = {layer.path: k for layer, k in zip(plan.layers, kernels)}
  blocks = {path: i for i, path in enumerate(plan.blocks)}

  def interceptor(next_fun, args, kwargs, context):
    path = relative_path(context.module) if context.method_name == "__call__" else None
    if path is None or not args:
      return next_fun(*args, **kwargs)
    if path in blocks and not keep[blocks[path]]:
      return args[0]
    layer = layers.get(path)
    if layer is None:
      if layer_kind(context.module) not in (None, "opaque"):
        raise _structure_error(path, "runs in this subnet but not in the full network")
      return next_fun(*args, **kwargs)
    called.add(path)
    if layer.kind == "batch_norm":
      return next_fun(*args, **kwargs)
    fields = {}
    width = label_width(layer.out_label, widths)
    if width != context.module.features:
      fields["features"] = width
      if layer.depthwise:
        fields["feature_group_count"] = width
    if layer.croppable and kernel_of[path] != layer.kernel_size[0]:
      k = kernel_of[path]
      fields["kernel_size"] = (k, k)
      if context.module.padding != "SAME":   # explicit (k - 1) / 2: keeps the output size
        fields["padding"] = (k - 1) // 2
    return run_clone(context.module, fields, args, kwargs) if fields else next_fun(*args, **kwargs)

  return interceptor


def _structure_error(path, what: str) -> ElasticizeError:
  return ElasticizeError(
      f"layer {path_text(path)} {what}: the model decides its structure from channel counts "
      "(e.g. `if x.shape[-1] != self.features:` adds a projection). A subnet changes those "
      "counts, so decide from the module's fields (strides, configured features) instead")


class DenseTwin(nn.Module):
  """A subnet of an :class:`ElasticNet` with static shapes: the user's module, its resized
  layers run at their active widths. ``apply(variables, x, train=False)``."""
  net: nn.Module
  plan_: Plan
  widths: tuple[int, ...]
  keep: tuple[int, ...]
  kernels: tuple[int, ...]      # per plan layer: its kernel size in this subnet
  train_arg: str
  sample_shape: tuple[int, ...]
  sample_dtype: str = "float32"

  @property
  def num_classes(self) -> int:
    return self.plan_.num_classes

  @property
  def input_spec(self) -> InputSpec:
    return input_spec_of(self.sample_shape, self.sample_dtype)

  @nn.compact
  def __call__(self, x, train: bool = False):
    called = set()
    with nn.intercept_methods(_dense_interceptor(self.plan_, self.widths, self.keep, self.kernels,
                                               called)):
      y = self.net(x, **call_kwargs(self.train_arg, train))
    for layer in self.plan_.layers:
      if all(self.keep[b] for b in layer.blocks) and layer.path not in called:
        raise _structure_error(layer.path, "runs in the full network but not in this subnet")
    return y


# --------------------------------------------------------------------------- variable slicing


def with_transformed_kernels(plan: Plan, variables, kernels, transforms, sizes: dict) -> dict:
  """``variables`` with each croppable conv's kernel replaced by its active size's transformed
  kernel (which the slicer then keeps whole), and without the transforms (``sizes``: layer
  index -> its kernel sizes)."""
  out = _as_dicts(variables)
  out["params"] = {k: v for k, v in out["params"].items() if k != TRANSFORMS}
  for i, choices in sizes.items():
    layer, k = plan.layers[i], kernels[i]
    node = _node(out["params"], (NET,) + layer.path)
    node["kernel"] = active_depthwise_kernels(node["kernel"], choices,
                                              transforms[path_text(layer.path)])[k]
  return out


def slice_variables(plan: Plan, variables, widths, keep, kernels) -> dict:
  """The dense twin's variables: each layer's kernel, bias and BatchNorm vectors cut to the
  active channels (croppable kernels to their centred taps); skipped blocks dropped."""
  out = _as_dicts(variables)   # fresh dicts: the slicing below edits them in place
  for layer, kernel in zip(plan.layers, kernels):
    if not all(keep[b] for b in layer.blocks):
      continue
    for collection in out:
      node = _node(out[collection], (NET,) + layer.path)
      if node is not None:
        _slice_layer(node, layer, widths, kernel)
  for b, path in enumerate(plan.blocks):
    if not keep[b]:
      for collection in out:
        _drop(out[collection], (NET,) + path)
  return out


def _as_dicts(tree):
  """Nested plain dicts (FrozenDicts and dicts alike) so the slicer can edit in place."""
  if hasattr(tree, "items"):
    return {k: _as_dicts(v) for k, v in tree.items()}
  return tree


def _node(tree: dict, path: Sequence[str]):
  for name in path:
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree


def _drop(tree: dict, path: Sequence[str]) -> None:
  parent = _node(tree, path[:-1])
  if parent is not None:
    parent.pop(path[-1], None)


def _slice_layer(node: dict, layer: Layer, widths, kernel: int) -> None:
  """One layer's variables (a params or batch_stats node), cut to the active channels (and a
  croppable conv's kernel to its centred ``kernel`` x ``kernel`` taps)."""
  out_idx = label_index(layer.out_label, widths)
  for name, value in list(node.items()):
    if isinstance(value, dict):
      continue
    if name == "kernel" and layer.croppable:   # a no-op on an already transformed kernel
      start = (value.shape[0] - kernel) // 2
      value = value[start:start + kernel, start:start + kernel]
    if name == "kernel":
      if layer.depthwise:
        value = value[..., out_idx]
      else:
        value = jnp.take(value, label_index(layer.in_label, widths), axis=-2)[..., out_idx]
    else:   # bias, BatchNorm's scale / bias / mean / var: one entry per output channel
      value = value[..., out_idx]
    node[name] = value
