"""Finding the channel groups of a user's Flax model by tracing it.

``trace`` runs the user's module once under ``jax.make_jaxpr`` with every supported layer's
input and output wrapped in an identity *tag* primitive (and every skippable block's), follows
the channel axes between the tags (:mod:`ofajax.elastic.channels`), and returns the
:class:`~ofajax.elastic.plan.Plan`: the layers with the groups of their input and output
channels, the groups with their sizes and why fixed ones are fixed, the skippable blocks. The
model's input and output channels are always fixed; operations the walk could not follow raise
an ``ElasticizeError`` naming them, unless their groups are fixed anyway (``frozen=``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from ofajax.elastic.channels import (LAYER_TYPES, Call, Walk, croppable, is_depthwise,
                                     layer_kind)
from ofajax.elastic.plan import ElasticizeError, Group, Layer, Plan, path_text

# --------------------------------------------------------------------------- tags


_TAG = jex.Primitive("ofajax_layer_tag")
_TAG.def_impl(lambda x, **_: x)
_TAG.def_abstract_eval(lambda x, **_: x)


def _path(module) -> tuple[str, ...]:
  return tuple(str(p) for p in module.scope.path)


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
    call = Call(path, module, kind, tuple(x.shape), blocks=tuple(open_blocks))
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
  walk = Walk(calls, {v: jax.tree_util.keystr(k) for v, (k, _) in zip(invars, flat)})
  groups = walk.groups
  channels = x.shape[-1]
  input_group = groups.new(channels, "input", "the model's input")
  [out_label] = walk.run(closed.jaxpr, [None] * len(flat) + [((input_group, channels),)])
  if not any(c.kind in LAYER_TYPES.values() for c in calls):
    raise ElasticizeError(
        "found no flax.linen Conv, ConvTranspose, Dense or BatchNorm layer in the model, so "
        "nothing can be made elastic; Flax NNX modules (even wrapped by nnx.bridge.ToLinen) "
        "are not supported: their layers are not linen modules that ofajax can intercept")
  if out_label is None:   # an output computed in ways not followed: its channels stay fixed
    size = closed.jaxpr.outvars[0].aval.shape[-1]
    out_label = ((groups.new(size, "output", "the model's output"), size),)
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


def _raise_unfollowed(walk: Walk) -> None:
  groups = walk.groups
  for label, what in walk.unfollowed:
    for g, _ in label:
      if not groups.fixed[groups.find(g)]:
        producers = groups.producers[groups.find(g)]
        raise ElasticizeError(
            f"{what} reads the channels of {', '.join(producers)}, which ofajax cannot follow "
            f"(it slices Conv, ConvTranspose, Dense and BatchNorm channels). Keep that width "
            f"fixed with frozen=({producers[0]!r},)")


def _plan(calls, walk: Walk, out_label, channels: int) -> Plan:
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
        call.path, call.kind, root(in_label), root(out_label_), is_depthwise(call), kernel,
        int(getattr(m, "feature_group_count", 1)), bool(getattr(m, "use_bias", False)),
        bool(getattr(m, "use_scale", False)), int(np.prod(call.out_shape[1:-1], dtype=np.int64)),
        tuple(block_paths.index(calls[b].path) for b in call.blocks), croppable(call)))
  out = root(out_label)
  table = tuple(Group(groups.size[r], tuple(dict.fromkeys(groups.producers[r])), groups.fixed[r])
                for r in order)
  return Plan(tuple(layers), table, tuple(block_paths), channels, sum(s for _, s in out))
