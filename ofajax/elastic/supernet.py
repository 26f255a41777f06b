"""A user's Flax module as a supernet: ``ElasticNet`` (masked execution).

It runs the user's module under ``nn.intercept_methods`` without rewriting it: every supported
layer's input and output are multiplied by their groups' prefix masks, so channels beyond a
group's active width are zero wherever a layer reads them; a croppable conv's taps outside the
active kernel are zeroed; a skipped block returns its input. BatchNorm normalises with the
active channels' batch statistics (per channel, so zeros elsewhere change nothing), updates only
the running statistics of active channels in blocks that ran, and sows the batch moments that
``ofajax.bn.calibrate_bn`` averages, as the built-in supernets do. Its dense twin is
:class:`ofajax.elastic.dense.DenseTwin`.

The user's variables sit under ``"net"``: ``{"params": {"net": user_params}, ...}``.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofajax.elastic import dense as dense_lib
from ofajax.elastic.plan import (TRANSFORMS, ElasticizeError, Layer, Plan, call_kwargs,
                                 input_spec_of, label_mask, label_width, path_text, relative_path)
from ofajax.elastic.tracing import trace
from ofajax.layers.cnn import padded_choice, transform_name
from ofajax.models.base import InputSpec, check_execution
from ofajax.space import Leaf, SearchSpace

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
  # OFA's learned kernel transforms: each smaller size is the next larger one's centre crop
  # through a k^2 x k^2 matrix shared by the conv's channels (identity at start, so the
  # converted model starts as plain centre crops). Held in params["kernel_transforms"].
  kernel_transforms: bool = False
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
    return input_spec_of(self.sample_shape, self.sample_dtype)

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
    transforms = self._transforms()
    kernels = {plan.layers[i].path: (arch["kernel"][j], sizes, transforms.get(path_text(
        plan.layers[i].path))) for j, (i, sizes) in enumerate(zip(self.kernel_layers(),
                                                                 self.kernel_values()))}
    interceptor = _masking_interceptor(plan, widths, keep, kernels)
    with nn.intercept_methods(interceptor):
      return self.net(x, **call_kwargs(self.train_arg, train))

  def _transforms(self) -> dict:
    """{layer path text: {"transform_7to5": [25, 25], ...}} (empty without transforms)."""
    if not self.kernel_transforms or not self.kernel_layers():
      return {}
    layers = self.plan().layers

    def init(_):
      out = {}
      for i, sizes in zip(self.kernel_layers(), self.kernel_values()):
        pairs = zip(sizes[::-1][:-1], sizes[::-1][1:])
        out[path_text(layers[i].path)] = {transform_name(a, b): jnp.eye(b * b, dtype=jnp.float32)
                                          for a, b in pairs}
      return out
    return self.param(TRANSFORMS, init)

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

  def dense_model(self, arch) -> dense_lib.DenseTwin:
    widths, keep, kernels = self._static(arch)
    return dense_lib.DenseTwin(self.net, self.plan(), widths, keep, kernels, self.train_arg,
                     self.sample_shape, self.sample_dtype, parent=None)

  def slice_variables(self, variables: dict, arch) -> dict:
    """The dense twin's variables: each layer's kernel, bias and BatchNorm vectors cut to the
    active channels; skipped blocks dropped."""
    widths, keep, kernels = self._static(arch)
    transforms = variables["params"].get(TRANSFORMS)
    if transforms:   # bake each conv's transformed kernel in; the dense twin has no transforms
      variables = dense_lib.with_transformed_kernels(
          self.plan(), variables, kernels, transforms, dict(zip(self.kernel_layers(),
                                                                self.kernel_values())))
    return dense_lib.slice_variables(self.plan(), variables, widths, keep, kernels)

  # ------------------------------------------------------------------ cost
  def cost(self, arch, resolution: int):
    """(MACs, params) of ``arch`` at ``resolution``; traced arch in, traced numbers out."""
    plan = self.plan(resolution)
    traced = not all(isinstance(v, np.ndarray) for v in arch.values())   # see cost.count
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


# --------------------------------------------------------------------------- masking


def _masking_interceptor(plan: Plan, widths, keep, kernels: dict):
  """Masks every supported layer's input and output to the arch's widths, runs a croppable
  conv at its active size (``kernels``: path -> (size, sizes, transforms or None)); gates
  blocks."""
  layers = {layer.path: layer for layer in plan.layers}
  blocks = {path: i for i, path in enumerate(plan.blocks)}
  open_blocks = []

  def interceptor(next_fun, args, kwargs, context):
    path = relative_path(context.module) if context.method_name == "__call__" else None
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
      y = _cropped_conv(context.module, *kernels[path], x, args, kwargs)
    else:
      y = next_fun(x, *args[1:], **kwargs)
    return y * out_mask.astype(y.dtype)

  return interceptor


def _cropped_conv(module, size, sizes, transforms, x, args, kwargs):
  """The conv with its ``size`` x ``size`` kernel (a centre crop, through OFA's transforms when
  given) zero-padded back to the full size: one program for every size."""
  variables = dict(module.variables)
  params = dict(variables["params"])
  params["kernel"], _ = padded_choice(params["kernel"], sizes, transforms, size)
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
