"""Finding the channel groups of a user's Flax model by tracing it.

A *channel group* is a set of channel axes that must keep the same active width: the outputs of
two convs joined by a residual add, a depthwise conv and its input, a BatchNorm and the layer it
normalises. ``trace`` runs the user's module once under ``jax.make_jaxpr`` with every supported
layer's input and output wrapped in an identity *tag* primitive, then follows the last axis of
every value through the jaxpr between the tags:

* a conv / dense output starts a new group; a depthwise conv and a BatchNorm pass their input's
  group through;
* elementwise ops (residual adds, activations, SE gating after broadcasting) merge the groups of
  equal-shaped operands; pooling and reductions over other axes keep the last axis' group;
* a concatenation on the channel axis gives a *label* of several segments, and flattening
  (H, W, C) -> H*W*C repeats C's segments H*W times.

Anything else that touches a channel axis (a reduction over channels, a reshape that splits it,
a parameter of the user's own multiplied onto it) is recorded with the layer it follows; after
the groups are known, those whose group stays elastic raise an error naming the operation, so a
user can freeze that group instead. The model's input and output channels are always fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

# --------------------------------------------------------------------------- layers it knows

LAYER_TYPES = {nn.Conv: "conv", nn.ConvTranspose: "conv_transpose", nn.Dense: "dense",
               nn.BatchNorm: "batch_norm"}
# Layers that read channels in ways a prefix mask cannot express: they are fine on frozen
# groups only.
OPAQUE_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.DenseGeneral, nn.Embed,
                nn.MultiHeadDotProductAttention, nn.ConvLocal)

_TAG = jex.Primitive("ofajax_layer_tag")
_TAG.def_impl(lambda x, **_: x)
_TAG.def_abstract_eval(lambda x, **_: x)


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


# --------------------------------------------------------------------------- recording calls


@dataclasses.dataclass
class _Call:
  path: tuple[str, ...]
  module: Any
  kind: str                   # a LAYER_TYPES value, "block" or "opaque"
  in_shape: tuple = ()
  out_shape: tuple = ()
  blocks: tuple = ()


def layer_kind(module) -> str | None:
  for cls, kind in LAYER_TYPES.items():
    if type(module) is cls:
      return kind
  if isinstance(module, OPAQUE_TYPES):
    return "opaque"
  return None


def _path(module) -> tuple[str, ...]:
  return tuple(str(p) for p in module.scope.path)


def path_text(path: Sequence[str]) -> str:
  return "/".join(path) or "<model>"


def _recording_interceptor(calls: list, skippable, open_blocks: list):
  """Tags every supported layer's input and output, and every skippable block's."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.scope is None or not args:
      return next_fun(*args, **kwargs)
    path = _path(module)
    kind = layer_kind(module)
    if kind is None and not skippable(path, module):
      return next_fun(*args, **kwargs)
    kind = kind or "block"
    index = len(calls)
    x = args[0]
    call = _Call(path, module, kind, tuple(x.shape), blocks=tuple(open_blocks))
    calls.append(call)
    x = _TAG.bind(x, index=index, side="in")
    if kind == "block":
      open_blocks.append(index)
    try:
      y = next_fun(x, *args[1:], **kwargs)
    finally:
      if kind == "block":
        open_blocks.pop()
    if not isinstance(y, jax.Array):
      raise ElasticizeError(f"{path_text(path)} returns {type(y).__name__}; a supported layer "
                            "or skippable block must return one array")
    call.out_shape = tuple(y.shape)
    return _TAG.bind(y, index=index, side="out")
  return interceptor


# --------------------------------------------------------------------------- union-find


class _Groups:
  def __init__(self):
    self.parent, self.size, self.producers, self.fixed = [], [], [], []

  def new(self, size: int, producer: str, fixed: str = "") -> int:
    self.parent.append(len(self.parent))
    self.size.append(int(size))
    self.producers.append([producer])
    self.fixed.append(fixed)
    return len(self.parent) - 1

  def find(self, g: int) -> int:
    while self.parent[g] != g:
      self.parent[g] = self.parent[self.parent[g]]
      g = self.parent[g]
    return g

  def union(self, a: int, b: int) -> None:
    a, b = self.find(a), self.find(b)
    if a != b:
      self.parent[b] = a
      self.producers[a] += self.producers[b]
      self.fixed[a] = self.fixed[a] or self.fixed[b]

  def fix(self, g: int, why: str) -> None:
    g = self.find(g)
    self.fixed[g] = self.fixed[g] or why


def _merge_labels(groups: _Groups, labels: list[Label], what: str) -> Label | None:
  """One label for operands that must agree channel by channel (a residual add)."""
  labels = [l for l in labels if l is not None]
  if not labels:
    return None
  first = labels[0]
  for other in labels[1:]:
    if [s for _, s in other] != [s for _, s in first]:
      raise ElasticizeError(f"{what}: operands split their channels differently "
                            f"({_sizes(first)} vs {_sizes(other)}); freeze one of the layers")
    for (a, _), (b, _) in zip(first, other):
      groups.union(a, b)
  return first


def _sizes(label: Label) -> list[int]:
  return [s for _, s in label]


# --------------------------------------------------------------------------- the jaxpr walk

_ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem", "select_n",
    "clamp", "and", "or", "xor", "eq", "ne", "gt", "lt", "ge", "le", "nextafter",
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "abs", "sign", "sqrt",
    "rsqrt", "cbrt", "integer_pow", "square", "convert_element_type", "stop_gradient", "erf",
    "erfc", "erf_inv", "floor", "ceil", "round", "is_finite", "not", "sin", "cos", "tan",
    "copy", "copy_p", "reduce_precision", "real", "imag", "asinh", "acosh", "atanh", "sinh",
    "cosh", "asin", "acos", "atan",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
               "reduce_or", "argmax", "argmin"}


class _Walk:
  """Follows labels through a jaxpr; collects constraints for the groups it cannot follow."""

  def __init__(self, calls: list[_Call], param_names: dict):
    self.calls = calls
    self.groups = _Groups()
    self.param_names = param_names       # jaxpr var -> parameter path (for error messages)
    self.call_labels: dict[int, tuple[Label | None, Label | None]] = {}
    self.layer_groups: dict[tuple, int] = {}   # path -> its output group (shared layers)
    self.inside = 0                       # > 0 while inside a supported layer
    self.last_layer = "the model's input"
    self.unfollowed: list[tuple[Label, str]] = []

  # ---------------------------------------------------------------- helpers
  def note(self, label: Label | None, what: str) -> None:
    if label is not None:
      self.unfollowed.append((label, f"{what} (after {self.last_layer})"))

  def run(self, jaxpr, labels_in: list) -> list:
    env = {}
    for v, label in zip(jaxpr.invars, labels_in):
      env[v] = label

    def read(v):
      return env.get(v) if isinstance(v, jex.Var) else None

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for v, label in zip(eqn.outvars, outs):
        env[v] = label
    return [read(v) for v in jaxpr.outvars]

  # ---------------------------------------------------------------- one equation
  def eqn(self, eqn, ins: list) -> list:
    name = eqn.primitive.name
    if name == "ofajax_layer_tag":
      return [self.tag(eqn, ins[0])]
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      n = len(sub.invars)
      return self.run(sub, ins[len(ins) - n:] if n <= len(ins) else ins + [None] * (n - len(ins)))
    if self.inside:
      return [None] * len(eqn.outvars)
    out_shape = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if all(label is None for label in ins):
      # Values computed from a parameter alone (reshaped, broadcast, cast) keep its name.
      names = [self.param_names[v] for v in eqn.invars
               if isinstance(v, jex.Var) and v in self.param_names]
      for v in eqn.outvars:
        if names:
          self.param_names[v] = names[0]
      return [None] * len(eqn.outvars)
    what = f"operation {name!r}"
    if name in _ELEMENTWISE:
      # Operands broadcast on their size-1 axes (implicitly, for equal ranks), so any operand
      # whose channel axis is full-size is read channel by channel.
      full = [l for l, v in zip(ins, eqn.invars)
              if v.aval.ndim == len(out_shape) and v.aval.shape[-1:] == tuple(out_shape[-1:])]
      label = _merge_labels(self.groups, full, what)
      self.check_params(eqn, out_shape, label)
      return [label]
    if name == "broadcast_in_dim":
      return [self.broadcast(eqn, ins[0])]
    if name in _REDUCTIONS or name.startswith("reduce_window") or name == "cumsum":
      return [self.keeps_last_axis(eqn, ins[0], what)]
    if name == "reshape":
      return [self.reshape(eqn, ins[0])]
    if name == "transpose":
      perm = eqn.params["permutation"]
      if perm[-1] == len(perm) - 1:
        return [ins[0]]
    if name == "concatenate":
      return [self.concatenate(eqn, ins)]
    if name in ("squeeze", "expand_dims"):
      if eqn.invars[0].aval.shape[-1:] == tuple(out_shape[-1:]):
        return [ins[0]]
    if name in ("pad", "slice", "dynamic_slice", "rev") and _last_axis_untouched(eqn):
      return [ins[0]]
    for label in ins:
      self.note(label, what)
    return [None] * len(eqn.outvars)

  def check_params(self, eqn, out_shape, label) -> None:
    """A parameter of the user's own (not in a supported layer) applied per channel."""
    for v in eqn.invars:
      if isinstance(v, jex.Var) and v in self.param_names and len(out_shape):
        shape = v.aval.shape
        if len(shape) and shape[-1] == out_shape[-1] and shape[-1] > 1:
          self.note(label, f"parameter {self.param_names[v]}, applied per channel,")

  def broadcast(self, eqn, label):
    dims = eqn.params["broadcast_dimensions"]
    in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if dims and dims[-1] == len(out_shape) - 1 and in_shape[-1] == out_shape[-1]:
      return label
    self.note(label, "a broadcast that moves the channel axis")
    return None

  def keeps_last_axis(self, eqn, label, what):
    ndim = len(eqn.invars[0].aval.shape)
    axes = eqn.params.get("axes")
    if axes is None and "window_dimensions" in eqn.params:
      axes = tuple(i for i, w in enumerate(eqn.params["window_dimensions"]) if w != 1)
    if axes is None and "axis" in eqn.params:
      axes = (eqn.params["axis"],)
    if axes is not None and ndim - 1 not in tuple(a % ndim for a in axes):
      return label
    self.note(label, f"{what} over the channel axis")
    return None

  def reshape(self, eqn, label):
    in_shape, out_shape = eqn.invars[0].aval.shape, tuple(eqn.outvars[0].aval.shape)
    if out_shape and out_shape[-1] == in_shape[-1]:
      return label
    # Flattening trailing axes (..., H, W, C) -> (..., H*W*C) repeats C's segments H*W times.
    for k in range(len(in_shape) - 1):
      if out_shape[:-1] == tuple(in_shape[:k]) and out_shape[-1] == int(np.prod(in_shape[k:])):
        return tuple(label) * int(np.prod(in_shape[k:-1]))
    self.note(label, f"a reshape {tuple(in_shape)} -> {out_shape} of the channel axis")
    return None

  def concatenate(self, eqn, ins):
    ndim = len(eqn.outvars[0].aval.shape)
    if eqn.params["dimension"] % ndim != ndim - 1:
      return _merge_labels(self.groups, ins, "a concatenation along a spatial axis")
    out = []
    for label, v in zip(ins, eqn.invars):
      if label is None:  # e.g. a constant channel: a fixed group of its own
        label = ((self.groups.new(v.aval.shape[-1], "constant", "a constant input"),
                  v.aval.shape[-1]),)
      out.extend(label)
    return tuple(out)

  # ---------------------------------------------------------------- tags
  def tag(self, eqn, label):
    call = self.calls[eqn.params["index"]]
    side = eqn.params["side"]
    if call.kind == "block":
      if side == "in":
        self.call_labels[eqn.params["index"]] = (label, None)
        return label
      in_label = self.call_labels[eqn.params["index"]][0]
      if call.in_shape != call.out_shape:
        raise ElasticizeError(f"skippable block {path_text(call.path)} maps shape "
                              f"{call.in_shape} to {call.out_shape}; only blocks whose output "
                              "has their input's shape can be skipped")
      return _merge_labels(self.groups, [in_label, label],
                           f"skippable block {path_text(call.path)}")
    if side == "in":
      self.inside += 1
      if label is None:  # input channels of unknown origin: fixed
        label = ((self.groups.new(call.in_shape[-1], path_text(call.path) + ":input",
                                  "its input's origin could not be followed"),
                  call.in_shape[-1]),)
      self.call_labels[eqn.params["index"]] = (label, None)
      return label
    self.inside -= 1
    self.last_layer = path_text(call.path)
    in_label = self.call_labels[eqn.params["index"]][0]
    out_label = self.output_label(call, in_label)
    self.call_labels[eqn.params["index"]] = (in_label, out_label)
    return out_label

  def output_label(self, call: _Call, in_label: Label) -> Label:
    module, c_out = call.module, call.out_shape[-1]
    name = path_text(call.path)
    if call.kind == "opaque":
      # A layer that mixes channels in ways a prefix cannot follow: fixed in and out.
      self.note(in_label, f"layer {name} ({type(module).__name__})")
      return ((self.groups.new(c_out, name, f"{type(module).__name__} is not elastic"), c_out),)
    if call.kind == "batch_norm" or _is_depthwise(call):
      if call.kind == "batch_norm" and module.axis not in (-1, len(call.in_shape) - 1):
        self.note(in_label, f"BatchNorm {name} over axis {module.axis}")
      return in_label
    if call.kind == "conv" and module.feature_group_count != 1:
      self.note(in_label, f"grouped conv {name} (feature_group_count="
                          f"{module.feature_group_count})")
      return ((self.groups.new(c_out, name, "a grouped conv's output"), c_out),)
    if call.path in self.layer_groups:  # a layer called twice: one output group
      return ((self.layer_groups[call.path], c_out),)
    group = self.groups.new(c_out, name)
    self.layer_groups[call.path] = group
    return ((group, c_out),)


def _is_depthwise(call: _Call) -> bool:
  module = call.module
  return (call.kind == "conv" and module.feature_group_count > 1
          and module.feature_group_count == call.in_shape[-1] == call.out_shape[-1])


def _croppable(call: _Call) -> bool:
  """A 2-D conv with an odd square kernel above 3x3 whose output size does not depend on the
  kernel: "SAME" padding, or explicit padding (k - 1) / 2 on every side (rewritten per size)."""
  m = call.module
  if call.kind != "conv" or len(m.kernel_size) != 2 or m.kernel_dilation not in (1, (1, 1), None):
    return False
  k = m.kernel_size[0]
  if m.kernel_size[1] != k or k % 2 == 0 or k <= 3:
    return False
  pad = m.padding
  return (pad == "SAME" or pad == (k - 1) // 2
          or (isinstance(pad, (tuple, list)) and all(tuple(p) == ((k - 1) // 2,) * 2
                                                    for p in pad)))


def _last_axis_untouched(eqn) -> bool:
  in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  if eqn.primitive.name == "rev":
    return len(in_shape) - 1 not in eqn.params["dimensions"]
  if eqn.primitive.name == "pad":
    return tuple(eqn.params["padding_config"][-1]) == (0, 0, 0)
  return in_shape[-1] == out_shape[-1]


def _sub_jaxpr(eqn):
  """The jaxpr a call-like equation runs (jit, custom_jvp / custom_vjp, remat), else None."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is not None and eqn.primitive.name not in ("cond", "while", "scan"):
      return getattr(sub, "jaxpr", sub)
  return None


# --------------------------------------------------------------------------- the whole trace


def as_predicate(skippable):
  """``skippable`` as given (module paths "a/b", or ``fn(path, module) -> bool``) -> a predicate
  on (path tuple, module)."""
  if callable(skippable):
    return lambda path, module: bool(skippable(path_text(path), module))
  wanted = {str(p).strip("/") for p in (skippable or ())}
  return lambda path, module: path_text(path) in wanted


def as_struct(sample) -> jax.ShapeDtypeStruct:
  """Shape and dtype of a sample input (an array, or already a ShapeDtypeStruct)."""
  if isinstance(sample, jax.ShapeDtypeStruct):
    return sample
  return jax.ShapeDtypeStruct(np.shape(sample), jnp.asarray(sample).dtype)


def trace(module, sample_input, call_kwargs: dict, skippable=(), frozen=()) -> Plan:
  """The channel groups, layers and skippable blocks of ``module`` applied to ``sample_input``."""
  x = as_struct(sample_input)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, **call_kwargs), x)
  calls, open_blocks = [], []
  is_skippable = as_predicate(skippable)
  with nn.intercept_methods(_recording_interceptor(calls, is_skippable, open_blocks)):
    closed = jax.make_jaxpr(lambda v, x: module.apply(v, x, **call_kwargs))(variables, x)
  if len(closed.jaxpr.outvars) != 1:
    raise ElasticizeError("the model must return one array of logits; it returns "
                          f"{len(closed.jaxpr.outvars)} arrays")
  _check_names(calls, skippable, frozen)
  flat = jax.tree_util.tree_flatten_with_path(variables)[0]
  invars = closed.jaxpr.invars
  walk = _Walk(calls, {v: jax.tree_util.keystr(k) for v, (k, _) in zip(invars, flat)})
  groups = walk.groups
  channels = x.shape[-1]
  input_group = groups.new(channels, "input", "the model's input")
  [out_label] = walk.run(closed.jaxpr, [None] * len(flat) + [((input_group, channels),)])
  for g, _ in out_label or ():
    groups.fix(g, "the model's output")
  frozen = {str(p).strip("/") for p in frozen}
  for call_index, (_, label) in walk.call_labels.items():
    if path_text(calls[call_index].path) in frozen:
      for g, _ in label or ():
        groups.fix(g, "frozen by the user")
  for g in range(len(groups.parent)):
    if groups.size[g] < 2:
      groups.fix(g, "one channel")
  _raise_unfollowed(walk)
  return _plan(calls, walk, out_label, channels)


def _check_names(calls, skippable, frozen) -> None:
  """Every named frozen layer and skippable block exists (a typo would silently do nothing)."""
  layers = sorted({path_text(c.path) for c in calls if c.kind not in ("opaque", "block")})
  blocks = {path_text(c.path) for c in calls if c.kind == "block"}
  for name in frozen:
    if str(name).strip("/") not in layers:
      raise ElasticizeError(f"frozen layer {name!r} is not a layer of the model; its layers "
                            f"are {layers}")
  for name in ([] if callable(skippable) else skippable or ()):
    if str(name).strip("/") in layers:
      raise ElasticizeError(f"skippable block {name!r} is a single layer; name the module "
                            "that holds the block's layers (its output replaces its input)")
    if str(name).strip("/") not in blocks:
      raise ElasticizeError(f"skippable block {name!r} is not a module the model calls "
                            "(paths are module names joined by '/', e.g. 'layer1/block0')")


def _raise_unfollowed(walk: _Walk) -> None:
  groups = walk.groups
  for label, what in walk.unfollowed:
    for g, _ in label:
      if not groups.fixed[groups.find(g)]:
        producers = groups.producers[groups.find(g)]
        raise ElasticizeError(
            f"{what} reads the channels of {', '.join(producers)}, which ofajax cannot follow "
            f"(it slices Conv, ConvTranspose, Dense and BatchNorm channels). Keep that width "
            f"fixed with frozen=({producers[0]!r},)")


def _plan(calls, walk: _Walk, out_label, channels: int) -> Plan:
  groups = walk.groups
  roots, order = {}, []

  def root(label):
    out = []
    for g, size in label:
      r = groups.find(g)
      if r not in roots:
        roots[r] = len(order)
        order.append(r)
      out.append((roots[r], size))
    return tuple(out)

  layers, seen = [], set()
  block_paths = []
  for index, call in enumerate(calls):
    if call.kind == "block":
      if call.path not in block_paths:
        block_paths.append(call.path)
      continue
    if call.kind == "opaque" or call.path in seen:
      continue
    seen.add(call.path)
    in_label, out_label_ = walk.call_labels[index]
    m = call.module
    kernel = tuple(getattr(m, "kernel_size", ()) or ())
    kernel = (kernel,) if isinstance(kernel, int) else kernel
    layers.append(Layer(
        call.path, call.kind, root(in_label), root(out_label_), _is_depthwise(call), kernel,
        int(getattr(m, "feature_group_count", 1)), bool(getattr(m, "use_bias", False)),
        bool(getattr(m, "use_scale", False)), int(np.prod(call.out_shape[1:-1], dtype=np.int64)),
        tuple(block_paths.index(calls[b].path) for b in call.blocks), _croppable(call)))
  out = root(out_label)
  table = tuple(Group(groups.size[r], tuple(dict.fromkeys(groups.producers[r])), groups.fixed[r])
                for r in order)
  return Plan(tuple(layers), table, tuple(block_paths), channels, sum(s for _, s in out))
