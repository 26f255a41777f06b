"""Post-training int8 quantization of a dense subnet, with Qwix.

``quantize(dense_model, dense_variables, calib_inputs)`` turns what :func:`ofajax.export.
extract_subnet` returns into an :class:`Int8Model`; ``save_stablehlo`` writes it like a float
subnet, loadable by :func:`ofajax.export.load_stablehlo` (plain JAX: no ofajax, no Qwix).

What is quantized, and how:

* **Weights.** Every ``kernel`` (conv HWIO, dense [in, out]) is stored as int8 in [-127, 127]
  with one float32 scale per output channel (symmetric: scale = the channel's largest |weight| /
  127, ``qwix.quantize``), also in the StableHLO artifact. First, each eval-mode BatchNorm
  that follows a conv is folded into its kernel (:func:`fold_batchnorm`): what remains of it is
  one float32 bias per channel. Biases and other parameters stay float32.
* **Ops.** Qwix's ``QtProvider`` intercepts the convs and dots of the modules that own a kernel
  and runs them as int8 x int8 -> int32 (``stablehlo.convolution`` / ``dot_general`` on i8),
  rescaled to float32. Depthwise convs ([k, k, 1, C] kernels) run in float32 on their
  dequantized int8 kernels by default (``depthwise="float"``: XLA:CPU's grouped convs are slow,
  see :data:`DEPTHWISE`), or as int8 XLA grouped convs (``depthwise="int8"``). Folded BNs'
  bias additions, BatchNorms that could not be folded, activations, pooling, SE's gating
  product and residual additions stay float32; so do the attention products of transformers
  (activation x activation).
* **Activations.** ``"static"`` (default): each quantized op's input is quantized per tensor
  with a fixed symmetric range, the largest absolute value it reached on the calibration
  batches (a few training batches), given to Qwix as ``act_calibration_method="fixed,-r,r"``.
  ``"dynamic"``: ranges computed at run time, per example (convs) or per row (dense layers and
  1x1 convs, which are dots over the pixels).

Why Qwix's quantized-training provider and not its PTQ path (qwix 0.1.8): ``PtqProvider`` stores
each weight in the shape its op consumes, and ofajax's 1x1 convs consume ``kernel[0, 0]``, so
its quantized [in, out] kernels fail the layer's 4-D slicing at apply time; and Qwix's own
static-range collection (``act_static_scale``, the SRQ flow) leaks a tracer out of
``conv_general_qt``'s custom_vjp for every conv. So the ranges are measured here (at the module
inputs, with ``flax.linen.intercept_methods``), and the stored int8 kernels are dequantized in
the graph (q * scale) for Qwix to quantize again per channel: absmax quantization is idempotent,
so its int8 operands are exactly the stored values (XLA folds this at compile time).

Qwix patches ``jax.lax`` functions while the model traces. Without ``disable_jit=True``, the
jitted ``jax.numpy`` functions the model calls (``jnp.dot``: the 1x1 convs) keep their first
trace in JAX's cache, with or without Qwix's ops: a float model traced after an int8 one then
ran some int8 dots, and an int8 model traced after a float one some float dots (measured: 1 point
of top-1 either way). So the provider runs with jit disabled inside the model (its inner
functions are inlined into the caller's trace; the caller still compiles as a whole).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from ofajax import export

QTYPE = jnp.int8
ACTIVATIONS = ("static", "dynamic")
# How convs with [k, k, 1, C] kernels (depthwise convs; also a first conv on grayscale images)
# run. Their kernels are stored int8 either way.
DEPTHWISE = {
    # float ops on the dequantized int8 kernels, with the model's own depthwise implementation.
    # XLA:CPU has no fast grouped conv, float or int8: as int8 ops the default workdir's
    # subnets ran 7-60x slower than float (bench/bench_int8.py), this way about as fast.
    "float": "weight-only int8",
    # int8 x int8 ops too, as XLA grouped convs (what an int8 accelerator runs well).
    "int8": "int8 ops",
}
# The ops Qwix quantizes: convs, and dots (nn.Dense, 1x1 convs). Einsums are left alone: in
# ofajax's dense models they are attention's activation x activation products.
OPS = ("conv_general_dilated", "dot_general")
_RANGES = "int8_ranges"  # the collection the calibration pass sows input ranges into
# Qwix's absmax maps a channel's largest |weight| to 127.5 steps (rounded: 127, or -128 for a
# negative one). Scaling the absmax by 127.5 / 127 makes the step absmax / 127 instead: values
# in [-127, 127], and re-quantizing a dequantized stored kernel gives back its very int8 values
# and scales (used when storing kernels and by Qwix in the graph).
_WEIGHT_CALIBRATION = f"absmax,{(np.iinfo(np.int8).max + 0.5) / np.iinfo(np.int8).max!r}"


@dataclasses.dataclass(frozen=True)
class Int8Model:
  """An int8 dense model that behaves like the float one: ``apply(variables, x, train=False)``
  (``variables``: :attr:`variables`; call it inside ``jax.jit``), or ``model(x)`` (jitted).
  ``ranges``: {module path: static input absmax} of the quantized modules (None: dynamic
  activations)."""
  model: nn.Module
  variables: dict
  ranges: dict | None
  qwix_model: nn.Module
  folded: frozenset = frozenset()  # the BatchNorms folded into kernels (fold_batchnorm)

  @property
  def input_spec(self):
    return self.model.input_spec

  def apply(self, variables: dict, x, train: bool = False):
    if train:
      raise ValueError("an int8 model only runs inference (train=False)")
    with folded_batchnorm(self.folded):
      return self.qwix_model.apply(dequantize_kernels(variables), x, train=False)

  def __call__(self, x):
    # jitted: apply run eagerly, op by op, gave other numbers (a training batch's loss 0.267
    # against 0.157 jitted and 0.161 in float), see logits_fn
    return self.logits_fn(x)

  @functools.cached_property
  def logits_fn(self):
    """``jax.jit(x -> logits)`` with the variables baked in as constants, as in the artifact:
    it computes the very numbers :func:`save_stablehlo`'s file does. Eager, or with the
    variables passed as arguments, XLA orders float ops differently and an activation lying on
    a rounding boundary may land on the neighbouring int8 step: logits then differ by about a
    quantization step, amplified by the layers after it."""
    return jax.jit(lambda x: self.apply(self.variables, x))


def quantize(dense_model: nn.Module, dense_variables: dict, calib_inputs=None, *,
             activations: str = "static", depthwise: str = "float",
             fold_bn: bool = True) -> Int8Model:
  """``dense_model`` with int8 kernels and int8 conv / dense ops (see the module docstring).

  ``calib_inputs``: [num_batches, batch, ...] model inputs (``evaluation.calibration_inputs``
  gives them) that set the static activation ranges; not needed for ``"dynamic"``.
  ``depthwise``: how convs with one input channel per kernel run, see :data:`DEPTHWISE`.
  ``fold_bn``: fold eval-mode BatchNorms into the kernels before quantizing
  (:func:`fold_batchnorm`; needs ``calib_inputs``, without them nothing is folded).
  """
  if activations not in ACTIVATIONS:
    raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
  if depthwise not in DEPTHWISE:
    raise ValueError(f"depthwise must be one of {tuple(DEPTHWISE)}, got {depthwise!r}")
  _check_dense(dense_model, dense_variables)
  owners = kernel_owners(dense_variables["params"], depthwise=depthwise == "int8")
  if not owners:
    raise ValueError(f"{type(dense_model).__name__} has no conv or dense kernel to quantize "
                     "(no 'kernel' parameter of 2 or more dimensions)")
  model = _quantizable(dense_model) if depthwise == "int8" else dense_model
  if activations == "static" and calib_inputs is None:
    raise ValueError("static activation ranges need calib_inputs ([num_batches, batch, ...] "
                     "training inputs), or use activations='dynamic'")
  calib = None if calib_inputs is None else _check_calib(model, calib_inputs)
  variables, folded = dense_variables, frozenset()
  if fold_bn and calib is not None:
    variables, folded = fold_batchnorm(model, dense_variables, calib[0])
  ranges = None
  if activations == "static":
    ranges = activation_ranges(model, variables, calib, owners, folded)
  provider = qwix.QtProvider(_rules(owners, ranges), disable_jit=True)
  return Int8Model(model, {**variables, "params": quantize_kernels(variables["params"])},
                   ranges, qwix.quantize_model(model, provider), folded)


def save_stablehlo(qmodel: Int8Model, path: str, resolution: int) -> jax.export.Exported:
  """Serialises ``x -> logits`` of ``qmodel`` like :func:`ofajax.export.save_stablehlo` (any
  batch size): the int8 kernels and their scales are the artifact's constants."""
  # export.save_stablehlo only needs .apply(variables, x, train=False) and .input_spec.
  return export.save_stablehlo(qmodel, qmodel.variables, path, resolution)


def _check_dense(dense_model, dense_variables) -> None:
  """A dense model and its variables, not a supernet (whose apply also takes an arch)."""
  if hasattr(dense_model, "search_space"):
    raise ValueError(f"{type(dense_model).__name__} is a supernet: quantize its dense subnet, "
                     "(dense_model, dense_variables) = ofajax.export.extract_subnet(model, "
                     "variables, arch)")
  if not isinstance(dense_model, nn.Module) or not hasattr(dense_model, "input_spec"):
    raise ValueError(f"dense_model must be a Flax model with an input_spec (what "
                     f"extract_subnet returns), got {type(dense_model).__name__}")
  if not isinstance(dense_variables, dict) or "params" not in dense_variables:
    what = sorted(dense_variables) if isinstance(dense_variables, dict) else type(
        dense_variables).__name__
    raise ValueError(f"dense_variables must be a dict with 'params' (and 'batch_stats'), as "
                     f"extract_subnet returns; got {what}")
  if any(isinstance(v, qwix.QArray) for v in jax.tree.leaves(
      dense_variables, is_leaf=lambda v: isinstance(v, qwix.QArray))):
    raise ValueError("dense_variables are already quantized (int8 kernels): pass the float "
                     "variables of the subnet")


# --------------------------------------------------------------------------- weights


def kernel_owners(params: dict, depthwise: bool = True) -> list[str]:
  """Paths ("stage0_block0/expand") of the modules owning a conv / dense ``kernel``; without
  those of [k, k, 1, C] kernels unless ``depthwise``."""
  flat = jax.tree_util.tree_leaves_with_path(params)
  return sorted("/".join(k.key for k in path[:-1]) for path, leaf in flat
                if _is_kernel(path, leaf) and (depthwise or not _is_depthwise(leaf)))


def _is_depthwise(kernel) -> bool:
  """A [k, k, 1, C] conv kernel, k > 1: a depthwise conv (or a first conv on grayscale input)."""
  shape = np.shape(kernel)
  return len(shape) == 4 and shape[2] == 1 and shape[0] > 1


def _is_kernel(path, leaf) -> bool:
  return path[-1].key == "kernel" and np.ndim(leaf) >= 2


def quantize_kernels(params: dict) -> dict:
  """``params`` with every kernel an int8 ``qwix.QArray`` (one scale per output channel: the
  last axis of conv HWIO and dense [in, out] kernels, the channel Qwix's ops quantize by)."""
  def one(path, leaf):
    if not _is_kernel(path, leaf):
      return leaf
    # The same 127.5 / 127 absmax scaling as in the graph (_WEIGHT_CALIBRATION): values in
    # [-127, 127], scale = channel absmax / 127. Plain absmax would map a channel's most
    # negative weight to -128 (-127.5 rounds to even), and Qwix's in-graph re-quantization of
    # that channel would then use another scale and other int8 values.
    return qwix.quantize(jnp.asarray(leaf, jnp.float32), QTYPE, channelwise_axes=(leaf.ndim - 1,),
                         calibration_method=_WEIGHT_CALIBRATION)
  return jax.tree_util.tree_map_with_path(one, params)


def dequantize_kernels(variables: dict):
  """The float variables the int8 kernels stand for (q * scale)."""
  return jax.tree.map(lambda v: qwix.dequantize(v) if isinstance(v, qwix.QArray) else v,
                      variables, is_leaf=lambda v: isinstance(v, qwix.QArray))


# --------------------------------------------------------------------------- BatchNorm folding


def fold_batchnorm(model: nn.Module, variables: dict, x) -> tuple[dict, frozenset]:
  """``(folded variables, folded BN paths)``: each eval-mode ``nn.BatchNorm`` over the last axis
  whose input is the very output of a kernel-owning module's method (a conv or dense layer; a
  ConvBN's conv) folded into that kernel. Run the model with the result inside
  ``folded_batchnorm(paths)``.

  Eval-mode BN is per channel ``(y - mean) * s + beta`` with ``s = scale / sqrt(var + eps)``,
  and ``y`` is linear in the kernel's output channels: the kernel (and a bias of its own) is
  multiplied by ``s`` and the BN becomes ``+ (beta - mean * s)``. Why: the int8 artifact then
  stores one float per channel instead of four (scale, bias, mean, var) and runs no BN ops.
  Per-channel weight quantization is unchanged by a per-channel factor (the int8 values stay
  the same, the scales absorb it). The pairing is found by tracing ``model`` on ``x`` (one
  batch) and checked on it: a folded model whose float outputs differ beyond round-off (a
  producer whose output also feeds something other than its BN, say) is refused.
  """
  pairs = _bn_producers(model, variables, x)
  if not pairs:
    return variables, frozenset()
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  stats = traverse_util.flatten_dict(variables.get("batch_stats", {}), sep="/")
  for bn, (owner, epsilon) in pairs.items():
    # in float64, so that the folded kernel is the exact product rounded once
    mean, var = (np.asarray(stats.pop(f"{bn}/{k}"), np.float64) for k in ("mean", "var"))
    scale = np.asarray(params.pop(f"{bn}/scale", 1.0), np.float64)
    s = scale / np.sqrt(var + epsilon)
    bias = np.asarray(params.get(f"{bn}/bias", 0.0), np.float64) - mean * s
    params[f"{bn}/bias"] = jnp.asarray(bias, jnp.float32)
    for name in ("kernel", "bias"):
      if f"{owner}/{name}" in params:  # scaled along the output channels (the last axis)
        params[f"{owner}/{name}"] = jnp.asarray(
            np.asarray(params[f"{owner}/{name}"], np.float64) * s, jnp.float32)
  folded = {**variables, "params": traverse_util.unflatten_dict(params, sep="/"),
            "batch_stats": traverse_util.unflatten_dict(stats, sep="/")}
  if not folded["batch_stats"]:
    del folded["batch_stats"]
  paths = frozenset(pairs)
  _check_folded(model, variables, folded, paths, x)
  return folded, paths


@contextlib.contextmanager
def folded_batchnorm(paths: frozenset):
  """Inside: the ``nn.BatchNorm`` modules at ``paths`` add their (folded) ``bias`` and do
  nothing else: their scale and statistics are in the kernel before them."""
  def add_bias(next_fun, args, kwargs, context):
    module = context.module
    if (paths and isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        and "/".join(module.scope.path) in paths):
      return args[0] + module.get_variable("params", "bias")
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(add_bias):
    yield


def _bn_producers(model: nn.Module, variables: dict, x) -> dict:
  """{BN path: (path of the module whose kernel produced its input, BN epsilon)}."""
  produced = {}  # id(output) -> (owner path, output): the output is kept so ids stay unique
  pairs = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if module.scope is None:
      return out
    path = "/".join(module.scope.path)
    if isinstance(module, nn.BatchNorm):
      source = produced.get(id(args[0]))
      mode = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
      eval_mode = module.use_running_average if mode is None else mode
      if (source is not None and source[1] is args[0] and eval_mode is True
          and kwargs.get("mask") is None and module.axis in (-1, args[0].ndim - 1)):
        pairs[path] = (source[0], module.epsilon)
    elif module.has_variable("params", "kernel") and isinstance(out, jax.Array):
      produced[id(out)] = (path, out)
    return out

  def trace(x):
    with nn.intercept_methods(record):
      return model.apply(variables, x, train=False)

  jax.eval_shape(trace, x)
  # a kernel feeding two BNs cannot take both factors
  owners = [owner for owner, _ in pairs.values()]
  return {bn: p for bn, p in pairs.items() if owners.count(p[0]) == 1}


def _check_folded(model, variables, folded, paths, x) -> None:
  """The folded model's outputs are the model's, to float32 round-off, on ``x``."""
  # Depthwise convs as single XLA ops: the same function, which compiles in 2/3 of the time of
  # the shifted multiply-adds (this check runs for every model quantized, in search too).
  model = _quantizable(model)

  @jax.jit
  def both(x):
    want = model.apply(variables, x, train=False)
    with folded_batchnorm(paths):
      return want, model.apply(folded, x, train=False)

  want, got = both(x)
  err = float(jnp.max(jnp.abs(got - want)))
  bound = 1e-4 * max(float(jnp.max(jnp.abs(want))), 1e-6)
  if not err <= bound:
    raise ValueError(f"folding {type(model).__name__}'s BatchNorms into the kernels changed its "
                     f"float outputs by {err:.3g} (> {bound:.3g}): some producer's output is "
                     "used elsewhere too; quantize with fold_bn=False")


# --------------------------------------------------------------------------- activations


def _quantizable(model: nn.Module) -> nn.Module:
  """``model`` with depthwise convs as XLA convs (which Qwix intercepts) rather than shifted
  multiply-adds (which it cannot): same function, same parameters."""
  if any(f.name == "depthwise_impl" for f in dataclasses.fields(model)):
    return model.clone(depthwise_impl="xla")
  return model


def _check_calib(model: nn.Module, calib_inputs) -> jax.Array:
  """``calib_inputs`` as an array of [num_batches, batch, ...] inputs the model reads."""
  x = np.asarray(calib_inputs)
  spec = model.input_spec
  ndim = 4 if spec.kind == "image" else 2
  what = ("[num_batches, batch, height, width, channels] float images" if spec.kind == "image"
          else "[num_batches, batch, length] int token ids")
  bad = (x.ndim != ndim + 1 or 0 in x.shape
         or (spec.kind == "image" and (x.shape[-1] != spec.channels or x.dtype.kind != "f"))
         or (spec.kind == "tokens" and x.dtype.kind not in "iu"))
  if bad:
    raise ValueError(f"calib_inputs must be {what}"
                     f"{f' with {spec.channels} channels' if spec.kind == 'image' else ''}; "
                     f"got {x.dtype} {x.shape}")
  return jnp.asarray(x)


def activation_ranges(model: nn.Module, variables: dict, calib_inputs, owners,
                      folded: frozenset = frozenset()) -> dict:
  """{module path: largest |input| over ``calib_inputs``} for the modules in ``owners``: the
  static range of the int8 op each applies to its input (a conv or dense layer). ``folded``:
  the BatchNorms :func:`fold_batchnorm` folded into ``variables``."""
  wanted = frozenset(owners)

  def observe(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and args and module.scope is not None
        and "/".join(module.scope.path) in wanted):
      module.sow(_RANGES, "absmax", jnp.max(jnp.abs(args[0])))
    return next_fun(*args, **kwargs)

  @jax.jit
  def batch_ranges(x):
    with folded_batchnorm(folded), nn.intercept_methods(observe):
      _, sown = model.apply(variables, x, train=False, mutable=[_RANGES])
    return sown[_RANGES]

  per_batch = [batch_ranges(x) for x in calib_inputs]
  flat = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda *r: jnp.max(jnp.stack(r)),
                                                          *per_batch))
  # A module called more than once sows a tuple: its range is the largest.
  out = {}
  for path, value in flat:
    name = "/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey)
                    and k.key != "absmax")
    out[name] = max(out.get(name, 0.0), float(value))
  return out


def _rules(owners, ranges: dict | None) -> list[qwix.QtRule]:
  """One Qwix rule per kernel-owning module: int8 weights (per channel) and int8 activations,
  static (a fixed range) or dynamic. A module whose input was all zeros in calibration (no
  range) keeps a float op, with its int8-rounded weights."""
  rules = []
  for name in owners:
    if ranges is not None and not ranges.get(name, 0.0) > 0.0:
      continue
    method = "absmax" if ranges is None else f"fixed,{-ranges[name]!r},{ranges[name]!r}"
    rules.append(qwix.QtRule(module_path=re.escape(name), op_names=OPS, weight_qtype=QTYPE,
                             weight_calibration_method=_WEIGHT_CALIBRATION, act_qtype=QTYPE,
                             act_calibration_method=method))
  return rules
