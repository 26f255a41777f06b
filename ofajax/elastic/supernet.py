"""A user's Flax module as a supernet: ``ElasticNet`` and its dense twin ``DenseTwin``.

Neither rewrites the user's code. Both run the user's module under ``nn.intercept_methods``:

* ``ElasticNet`` (masked execution) multiplies every supported layer's input and output by its
  groups' prefix masks, so channels beyond a group's active width are zero wherever a layer
  reads them; a skipped block returns its input. BatchNorm normalises with the active channels'
  batch statistics (per channel, so zeros elsewhere change nothing), updates only the running
  statistics of active channels in blocks that ran, and sows the batch moments that
  ``ofajax.bn.calibrate_bn`` averages, exactly as the built-in supernets do.
* ``DenseTwin`` runs each layer whose width changes as a clone of that layer with the smaller
  ``features`` (Flax's own code, so every option of the layer keeps its meaning) on variables
  sliced by :meth:`ElasticNet.slice_variables`; skipped blocks are not called at all.

The user's variables sit under ``"net"``: ``{"params": {"net": user_params}, ...}``.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofajax.elastic.tracing import ElasticizeError, Layer, Plan, layer_kind, path_text, trace
from ofajax.models.base import InputSpec, check_execution
from ofajax.space import Leaf, SearchSpace

NET = "net"   # the user's module's name inside the supernet (and its variables' top key)


# --------------------------------------------------------------------------- shared helpers


def call_kwargs(train_arg: str, train: bool) -> dict:
  """How the user's module hears the train flag: ``"train"`` -> train=..., ``"!deterministic"``
  -> deterministic=not train, ``""`` -> nothing."""
  if not train_arg:
    return {}
  if train_arg.startswith("!"):
    return {train_arg[1:]: not train}
  return {train_arg: train}


def _relative_path(module) -> tuple[str, ...] | None:
  """The module's path inside the user's model, None for anything outside it (the supernet
  itself, or a layer clone run on its own)."""
  if module.scope is None:
    return None
  path = tuple(str(p) for p in module.scope.path)
  return path[1:] if path[:1] == (NET,) else None


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


def _run_clone(module, fields: dict, args, kwargs):
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


# --------------------------------------------------------------------------- the supernet


class ElasticNet(nn.Module):
  """Supernet from a user's module; build it with :func:`ofajax.elasticize`."""
  net: nn.Module
  sample_shape: tuple[int, ...]
  sample_dtype: str = "float32"
  train_arg: str = "train"
  widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
  divisor: int = 1
  skippable: Any = ()           # module paths ("layer1/block0"), or fn(path, module) -> bool
  frozen: tuple[str, ...] = ()  # layer paths whose output width stays fixed
  kernels: bool = True          # elastic kernel size (centre crop) for convs above 3x3
  execution: str = "masked"
  executions: ClassVar[tuple[str, ...]] = ("masked",)

  # ------------------------------------------------------------------ static structure
  def plan(self, resolution: int | None = None) -> Plan:
    """The traced layers and groups (at ``resolution``: layers' output sizes depend on it)."""
    shape = self.sample_shape
    if resolution is not None and self.input_spec.kind == "image":
      shape = (shape[0], resolution, resolution, shape[-1])
    elif resolution is not None:
      shape = (shape[0], resolution)
    # Inside apply ``self.net`` is bound (unhashable); the cache keys on an unbound copy.
    net = self.net.clone(parent=None, name=None) if self.net.scope is not None else self.net
    return _trace_cached(net, shape, self.sample_dtype, self.train_arg,
                         _hashable(self.skippable), tuple(self.frozen))

  @property
  def num_classes(self) -> int:
    return self.plan().num_classes

  @property
  def input_spec(self) -> InputSpec:
    return _input_spec(self.sample_shape, self.sample_dtype)

  def elastic_groups(self) -> tuple[int, ...]:
    """Indices (into ``plan().groups``) of the groups arch["width"] sets, in its order."""
    return tuple(i for i, g in enumerate(self.plan().groups) if not g.fixed_by)

  def group_values(self) -> tuple[tuple[int, ...], ...]:
    """Per arch["width"] position, the widths it may take (ascending)."""
    plan = self.plan()
    out = []
    for g in self.elastic_groups():
      size = plan.groups[g].size
      values = {size}
      for f in self.widths:
        if not 0 < f <= 1:
          raise ElasticizeError(f"width fractions must be in (0, 1], got {f}")
        w = int(round(f * size / self.divisor)) * self.divisor
        if w < 1:
          raise ElasticizeError(
              f"width fraction {f} leaves no channel of {plan.groups[g].producers[0]} "
              f"({size} channels, divisor {self.divisor}); use a larger fraction")
        values.add(min(w, size))
      out.append(tuple(sorted(values)))
    return tuple(out)

  def kernel_layers(self) -> tuple[int, ...]:
    """Indices (into ``plan().layers``) of the convs arch["kernel"] sizes, in its order."""
    if not self.kernels:
      return ()
    return tuple(i for i, layer in enumerate(self.plan().layers) if layer.croppable)

  def kernel_values(self) -> tuple[tuple[int, ...], ...]:
    """Per arch["kernel"] position, its sizes: every odd size from 3 to the conv's own."""
    layers = self.plan().layers
    return tuple(tuple(range(3, layers[i].kernel_size[0] + 1, 2)) for i in self.kernel_layers())

  def search_space(self) -> SearchSpace:
    leaves, allowed = [], {}
    for name, per_position in (("width", self.group_values()), ("kernel", self.kernel_values())):
      if per_position:
        values = tuple(sorted(set().union(*per_position)))
        leaves.append(Leaf(name, (len(per_position),), values))
        allowed[name] = np.array([[v in p for v in values] for p in per_position], bool)
    blocks = self.plan().blocks
    if blocks:
      leaves.append(Leaf("keep", (len(blocks),), (0, 1)))
    if not leaves:
      raise ElasticizeError("nothing in this model is elastic: every channel group is fixed "
                            "(see ofajax.elastic.describe) and no block is skippable")
    resolution = self.sample_shape[1]
    return SearchSpace(leaves, allowed=allowed, resolutions=(resolution,))

  def group_widths(self, arch, xp=jnp):
    """Active width of every group (fixed groups at full size), numpy or traced."""
    sizes = [g.size for g in self.plan().groups]
    elastic = list(self.elastic_groups())
    if xp is np:
      full = np.asarray(sizes, np.int64)
      if elastic:
        full[elastic] = np.asarray(arch["width"]).reshape(-1)
      return full
    full = jnp.asarray(sizes, jnp.float32)
    return full.at[jnp.asarray(elastic, jnp.int32)].set(arch["width"]) if elastic else full

  # ------------------------------------------------------------------ forward (masked)
  @nn.compact
  def __call__(self, x, arch, train: bool = False):
    check_execution(self.execution, self.executions)
    plan = self.plan(x.shape[1])   # a flatten's repeats depend on the resolution
    widths = self.group_widths(arch)
    keep = arch.get("keep", jnp.ones((len(plan.blocks),), jnp.int32))
    kernels = {plan.layers[i].path: arch["kernel"][j] for j, i in enumerate(self.kernel_layers())}
    interceptor = _masking_interceptor(plan, widths, keep, kernels)
    with nn.intercept_methods(interceptor):
      return self.net(x, **call_kwargs(self.train_arg, train))

  # ------------------------------------------------------------------ dense subnet
  def _static(self, arch):
    """(widths per group, keep per block, kernel size per layer) as Python ints."""
    plan = self.plan()
    widths = tuple(int(w) for w in self.group_widths(arch, np))
    keep = tuple(int(k) for k in np.asarray(arch.get("keep", [1] * len(plan.blocks))))
    kernels = [l.kernel_size[0] if l.kernel_size else 1 for l in plan.layers]
    for j, i in enumerate(self.kernel_layers()):
      kernels[i] = int(np.asarray(arch["kernel"])[j])
    return widths, keep, tuple(kernels)

  def dense_model(self, arch) -> "DenseTwin":
    widths, keep, kernels = self._static(arch)
    return DenseTwin(self.net, self.plan(), widths, keep, kernels, self.train_arg,
                     self.sample_shape, self.sample_dtype, parent=None)

  def slice_variables(self, variables: dict, arch) -> dict:
    """The dense twin's variables: each layer's kernel, bias and BatchNorm vectors cut to the
    active channels; skipped blocks dropped."""
    widths, keep, kernels = self._static(arch)
    plan = self.plan()
    out = jax.tree.map(lambda a: a, _as_dicts(variables))
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

  # ------------------------------------------------------------------ cost
  def cost(self, arch, resolution: int):
    """(MACs, params) of ``arch`` at ``resolution``; traced arch in, traced numbers out."""
    plan = self.plan(resolution)
    traced = not isinstance(arch["width" if "width" in arch else "keep"], np.ndarray)
    xp = jnp if traced else np
    widths = self.group_widths(arch, xp)
    keep = arch.get("keep", np.ones((len(plan.blocks),), np.int64))
    kernel_of = {i: arch["kernel"][j] for j, i in enumerate(self.kernel_layers())}
    macs, params = 0, 0
    for i, layer in enumerate(plan.layers):
      live = 1
      for b in layer.blocks:
        live = live * keep[b]
      m, p = layer_cost(layer, widths, kernel_of.get(i))
      macs, params = macs + live * m, params + live * p
    return macs, params


def layer_cost(layer: Layer, widths, kernel=None):
  """(MACs, params) of one layer at the active widths and (for a croppable conv) ``kernel``
  size (OFA's convention: every kernel tap counts, BatchNorm costs parameters only)."""
  cin, cout = label_width(layer.in_label, widths), label_width(layer.out_label, widths)
  if layer.kind == "batch_norm":
    return 0, cout * (int(layer.use_scale) + int(layer.use_bias))
  taps = int(np.prod(layer.kernel_size)) if layer.kernel_size else 1
  if kernel is not None:
    taps = kernel * kernel
  if layer.depthwise:
    weights = taps * cout
  else:
    weights = taps * (cin // layer.groups) * cout
  return layer.out_positions * weights, weights + (cout if layer.use_bias else 0)


@functools.lru_cache(maxsize=64)
def _trace_cached(net, shape, dtype, train_arg, skippable, frozen) -> Plan:
  sample = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  return trace(net, sample, call_kwargs(train_arg, False), skippable=skippable, frozen=frozen)


def _hashable(skippable):
  return skippable if callable(skippable) else tuple(skippable or ())


def _input_spec(shape, dtype) -> InputSpec:
  if jnp.issubdtype(jnp.dtype(dtype), jnp.integer) and len(shape) == 2:
    return InputSpec("tokens", vocab_size=0)
  if len(shape) == 4:
    return InputSpec("image", channels=int(shape[-1]))
  raise ElasticizeError(f"sample_input has shape {tuple(shape)}; elasticize takes NHWC images "
                        "[B, H, W, C] (or int token ids [B, T])")


# --------------------------------------------------------------------------- interceptors


def _masking_interceptor(plan: Plan, widths, keep, kernels: dict):
  """Masks every supported layer's input and output to the arch's widths, zeroes the kernel
  taps outside a croppable conv's active size (``kernels``: path -> size); gates blocks."""
  layers = {layer.path: layer for layer in plan.layers}
  blocks = {path: i for i, path in enumerate(plan.blocks)}
  open_blocks = []

  def interceptor(next_fun, args, kwargs, context):
    path = _relative_path(context.module) if context.method_name == "__call__" else None
    if path is None or not args:
      return next_fun(*args, **kwargs)
    if path in blocks:
      k = keep[blocks[path]]
      open_blocks.append(k)
      try:
        y = next_fun(*args, **kwargs)
      finally:
        open_blocks.pop()
      return jnp.where(k > 0, y, args[0])
    layer = layers.get(path)
    if layer is None:
      return next_fun(*args, **kwargs)
    x = args[0] * label_mask(layer.in_label, widths).astype(args[0].dtype)
    out_mask = label_mask(layer.out_label, widths)
    if layer.kind == "batch_norm":
      ran = functools.reduce(jnp.logical_and, [k > 0 for k in open_blocks], jnp.bool_(True))
      y = _masked_batch_norm(next_fun, context.module, x, args, kwargs, (out_mask > 0) & ran)
    elif path in kernels and not context.module.is_initializing():
      y = _cropped_conv(context.module, layer.kernel_size[0], kernels[path], x, args, kwargs)
    else:
      y = next_fun(x, *args[1:], **kwargs)
    return y * out_mask.astype(y.dtype)

  return interceptor


def _cropped_conv(module, full: int, size, x, args, kwargs):
  """The conv with its kernel's taps outside the centred ``size`` x ``size`` window zeroed."""
  ring = jnp.abs(jnp.arange(full) - full // 2) <= (size - 1) // 2
  taps = (ring[:, None] & ring[None, :]).astype(jnp.float32)[:, :, None, None]
  variables = dict(module.variables)
  params = dict(variables["params"])
  params["kernel"] = params["kernel"] * taps.astype(params["kernel"].dtype)
  return module.clone(parent=None).apply({**variables, "params": params}, x, *args[1:], **kwargs)


def _masked_batch_norm(next_fun, module, x, args, kwargs, keep):
  """Flax's BatchNorm on masked ``x``; in training, running statistics change only where
  ``keep``, and the batch moments are sown for calibration."""
  use_running = nn.merge_param("use_running_average", module.use_running_average,
                               kwargs.get("use_running_average",
                                          args[1] if len(args) > 1 else None))
  if module.is_initializing() or use_running:
    return next_fun(x, *args[1:], **kwargs)
  # A clone with every collection mutable computes the update, whatever the caller made
  # mutable (calibration makes only "bn_moments" mutable); it is written back selectively.
  variables = dict(module.variables)
  rest = {k: v for k, v in kwargs.items() if k != "use_running_average"}
  y, updated = module.clone(parent=None, use_running_average=False).apply(
      variables, x, mutable=["batch_stats"], **rest)
  old = variables["batch_stats"]
  if module.is_mutable_collection("batch_stats"):
    for name in ("mean", "var"):
      module.put_variable("batch_stats", name,
                          jnp.where(keep, updated["batch_stats"][name], old[name]))
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
  module.sow("bn_moments", "mean", jnp.where(keep, mean, old["mean"]))
  module.sow("bn_moments", "var", jnp.where(keep, var, old["var"]))
  return y


def _dense_interceptor(plan: Plan, widths, keep, kernels, called: set):
  """Runs each resized layer as a clone with its smaller width; skips dropped blocks; records
  the layers it ran in ``called``."""
  layers = {layer.path: layer for layer in plan.layers}
  kernel_of = {layer.path: k for layer, k in zip(plan.layers, kernels)}
  blocks = {path: i for i, path in enumerate(plan.blocks)}

  def interceptor(next_fun, args, kwargs, context):
    path = _relative_path(context.module) if context.method_name == "__call__" else None
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
    return _run_clone(context.module, fields, args, kwargs) if fields else next_fun(*args, **kwargs)

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
    return _input_spec(self.sample_shape, self.sample_dtype)

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
    if name == "kernel" and layer.croppable:
      start = (layer.kernel_size[0] - kernel) // 2
      value = value[start:start + kernel, start:start + kernel]
    if name == "kernel":
      if layer.depthwise:
        value = value[..., out_idx]
      else:
        value = jnp.take(value, label_index(layer.in_label, widths), axis=-2)[..., out_idx]
    else:   # bias, BatchNorm's scale / bias / mean / var: one entry per output channel
      value = value[..., out_idx]
    node[name] = value
