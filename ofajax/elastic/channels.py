"""Following channel axes through a traced jaxpr (the walk behind ``tracing.trace``).

Between the tags around each supported layer, every value's last axis gets a label:

* a conv / dense output starts a new group; a depthwise conv and a BatchNorm pass their input's
  group through;
* elementwise ops (residual adds, activations, SE gating after broadcasting) merge the groups of
  operands with a full channel axis; pooling and reductions over other axes keep the label;
* a concatenation on the channel axis puts the operands' labels side by side, and flattening
  (H, W, C) -> H*W*C repeats C's segments H*W times.

Anything else that touches a labelled channel axis (a reduction over channels, a reshape that
splits it, a parameter of the user's own applied per channel) is noted with the layer it
follows; ``tracing`` raises for the notes whose groups stay elastic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import numpy as np
from jax.extend import core as jex

from ofajax.elastic.plan import ElasticizeError, Label, path_text

# --------------------------------------------------------------------------- layers it knows


LAYER_TYPES = {nn.Conv: "conv", nn.ConvTranspose: "conv_transpose", nn.Dense: "dense",
               nn.BatchNorm: "batch_norm"}


# Layers that read channels in ways a prefix mask cannot express: they are fine on frozen
# groups only.
OPAQUE_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.DenseGeneral, nn.Embed,
                nn.MultiHeadDotProductAttention, nn.ConvLocal)


@dataclasses.dataclass
class Call:
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


def is_depthwise(call: Call) -> bool:
  module = call.module
  return (call.kind == "conv" and module.feature_group_count > 1
          and module.feature_group_count == call.in_shape[-1] == call.out_shape[-1])


def croppable(call: Call) -> bool:
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


class Walk:
  """Follows labels through a jaxpr; collects constraints for the groups it cannot follow."""

  def __init__(self, calls: list[Call], param_names: dict):
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

  def output_label(self, call: Call, in_label: Label) -> Label:
    module, c_out = call.module, call.out_shape[-1]
    name = path_text(call.path)
    if call.kind == "opaque":
      # A layer that mixes channels in ways a prefix cannot follow: fixed in and out.
      self.note(in_label, f"layer {name} ({type(module).__name__})")
      return ((self.groups.new(c_out, name, f"{type(module).__name__} is not elastic"), c_out),)
    if call.kind == "batch_norm" or is_depthwise(call):
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
