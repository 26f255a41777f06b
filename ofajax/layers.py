"""Elastic layers: parameters at maximum shape, active sizes as traced arguments.

Every elastic module has a dense twin with the same parameter names, so exporting a subnet is
slicing (see each elastic module's ``slice_variables``). Width is a prefix mask over channels;
inactive channels are multiplied to exactly zero after every layer that could make them non-zero
(BatchNorm's bias, a conv bias, SE's gate), so they never leak into the next layer.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# --------------------------------------------------------------------------- helpers


def make_divisible(v, divisor: int = 8, min_value: int | None = None):
  """OFA's / MobileNet's channel rounding, for Python ints and for (traced) integer arrays."""
  min_value = divisor if min_value is None else min_value
  if isinstance(v, (int, float, np.integer, np.floating)):
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v
  # Integer arrays: int(v + d/2) == v + d//2 for integer v and even d.
  xp = jnp if isinstance(v, jax.Array) else np
  new_v = xp.maximum(min_value, (v + divisor // 2) // divisor * divisor)
  return xp.where(new_v * 10 < 9 * v, new_v + divisor, new_v)


def channel_mask(active, size: int, dtype=jnp.float32) -> jax.Array:
  """A [size] prefix mask with ``active`` ones; ``active=None`` means all."""
  if active is None:
    return jnp.ones((size,), dtype)
  return (jnp.arange(size) < active).astype(dtype)


def lookup(value, keys: Sequence[int], outs: Sequence[int]):
  """Maps a (traced or concrete) int ``value`` in ``keys`` to ``outs`` without Python branching."""
  xp = jnp if isinstance(value, jax.Array) else np
  keys_arr, outs_arr = xp.asarray(keys), xp.asarray(outs)
  return (xp.where(xp.asarray(value)[..., None] == keys_arr, outs_arr, 0)).sum(-1)


def h_sigmoid(x):
  return jax.nn.relu6(x + 3.0) / 6.0


def h_swish(x):
  return x * h_sigmoid(x)


ACTIVATIONS = {"relu": jax.nn.relu, "relu6": jax.nn.relu6, "h_swish": h_swish,
               "identity": lambda x: x}


def conv_output_size(size: int, kernel: int, stride: int) -> int:
  """Spatial size after a conv with OFA's symmetric 'same' padding of ``kernel // 2``."""
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


# --------------------------------------------------------------------------- convolutions


def conv2d(x, kernel, stride: int = 1):
  """Regular conv, NHWC/HWIO, symmetric padding k//2 as PyTorch/OFA pad (so imported weights
  see the same pixels)."""
  k = kernel.shape[0]
  if k == 1 and stride == 1:
    return jnp.einsum("nhwi,io->nhwo", x, kernel[0, 0])
  p = k // 2
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def depthwise_conv2d(x, kernel, stride: int = 1, impl: str = "shift"):
  """Depthwise conv with kernel [k, k, 1, C] and symmetric padding k//2.

  ``impl="shift"`` sums k*k shifted multiply-adds (DESIGN.md: 12x faster forward than XLA's
  grouped convolution on CPU); ``impl="xla"`` uses ``lax.conv_general_dilated`` with
  ``feature_group_count=C`` (cuDNN's depthwise path on GPU).
  """
  k = kernel.shape[0]
  p = k // 2
  if impl == "xla":
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[-1])
  if impl != "shift":
    raise ValueError(f"depthwise impl must be 'shift' or 'xla', got {impl!r}")
  return _shift_depthwise(x, kernel, stride)


def _shift_taps(xp, kernel, stride: int, ho: int, wo: int):
  """sum_ij xp[:, i::stride, j::stride, :] * kernel[i, j, 0], on a pre-padded input."""
  k = kernel.shape[0]
  out = None
  for i in range(k):
    for j in range(k):
      tap = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


# A hand-written VJP: autodiff of the 49 shifted slices gives 49 pad ops into which XLA:CPU
# copies the whole upstream chain (conv, BN, activation), recomputing it per tap; the masked
# supernet's forward+backward then ran ~3x slower than the dense net's. Here the input gradient
# is one shift correlation of the dilated output gradient with the flipped kernel.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_depthwise(x, kernel, stride: int):
  k, p = kernel.shape[0], kernel.shape[0] // 2
  ho, wo = conv_output_size(x.shape[1], k, stride), conv_output_size(x.shape[2], k, stride)
  return _shift_taps(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))), kernel, stride, ho, wo)


def _shift_depthwise_fwd(x, kernel, stride):
  return _shift_depthwise(x, kernel, stride), (x, kernel)


def _shift_depthwise_bwd(stride, residuals, g):
  x, kernel = residuals
  k, p = kernel.shape[0], kernel.shape[0] // 2
  h, w = x.shape[1], x.shape[2]
  ho, wo = g.shape[1], g.shape[2]
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  # dx[v] = sum_t dilated(g)[v + p - t] * kernel[t]: pad the dilated gradient by k-1-p = p on
  # the low side and enough on the high side to give back h x w, then correlate with the flip.
  g_dilated = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), (p, h - span_h + p, stride - 1),
                                                  (p, w - span_w + p, stride - 1), (0, 0, 0)])
  dx = _shift_taps(g_dilated, kernel[::-1, ::-1], 1, h, w)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  dk = jnp.stack([jnp.sum(xp[:, i:i + span_h:stride, j:j + span_w:stride, :] * g, axis=(0, 1, 2))
                  for i in range(k) for j in range(k)])
  return dx, dk.reshape(kernel.shape)


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


# OFA's initialisation ("he_fout"): convs (SE's 1x1 convs too) N(0, 2 / (k*k*out)), biases zero;
# linear layers U(-1/sqrt(in), 1/sqrt(in)). Untruncated normals also compile faster than
# truncated ones, which matters with ~100 parameters per supernet.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")





# --------------------------------------------------------------------------- batch norm


class ElasticBatchNorm(nn.Module):
  """BatchNorm over the active channels; same names and formula as ``nn.BatchNorm``.

  Training normalises with the batch statistics of the subnet being run. Running statistics
  are only updated for active channels, only when ``update`` is true (a caller may freeze a
  layer's statistics) and only when "batch_stats" is mutable;
  ``ofajax.bn.calibrate_bn`` re-estimates them per subnet from the sown batch moments.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool, mask=None, update=True):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
      keep = jnp.asarray(update, bool)
      if mask is not None:
        keep = keep & (mask > 0)
      if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
        m = self.momentum
        ra_mean.value = jnp.where(keep, m * ra_mean.value + (1 - m) * mean, ra_mean.value)
        ra_var.value = jnp.where(keep, m * ra_var.value + (1 - m) * var, ra_var.value)
      # Exact per-batch moments for ofajax.bn.calibrate_bn (a no-op unless it asks for them).
      self.sow("bn_moments", "mean", jnp.where(keep, mean, ra_mean.value))
      self.sow("bn_moments", "var", jnp.where(keep, var, ra_var.value))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return y if mask is None else y * mask


# --------------------------------------------------------------------------- conv + bn + act


class ElasticConvBN(nn.Module):
  """Conv (k x k) -> BN -> activation with an elastic number of output channels."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  act: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool, out_active=None):
    kernel = self.param("kernel", CONV_INIT, (self.kernel_size, self.kernel_size, x.shape[-1],
                                                 self.features))
    mask = channel_mask(out_active, self.features)
    y = conv2d(x, kernel, self.stride)
    y = ElasticBatchNorm(name="bn")(y, train, mask)
    return ACTIVATIONS[self.act](y)  # every activation here maps 0 to 0, so no second mask

  @staticmethod
  def slice_variables(tree, in_active: int, out_active: int):
    return {"kernel": tree["kernel"][:, :, :in_active, :out_active],
            "bn": {k: v[:out_active] for k, v in tree["bn"].items()}}


class ConvBN(nn.Module):
  """Dense twin of :class:`ElasticConvBN`."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  act: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool):
    kernel = self.param("kernel", CONV_INIT, (self.kernel_size, self.kernel_size, x.shape[-1],
                                                 self.features))
    y = conv2d(x, kernel, self.stride)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(y)
    return ACTIVATIONS[self.act](y)


# --------------------------------------------------------------------------- depthwise


def _crop(kernel, size: int):
  start = (kernel.shape[0] - size) // 2
  return kernel[start:start + size, start:start + size]


def transform_name(src: int, dst: int) -> str:
  return f"transform_{src}to{dst}"


def active_depthwise_kernels(kernel, kernel_choices: Sequence[int], transforms: dict | None):
  """Kernels for every choice, largest first, each k x k: OFA's centred crop, optionally through
  the learned k^2 x k^2 transform (OFA applies ``flat @ M.T`` per channel, chaining 7->5->3)."""
  choices = sorted(kernel_choices, reverse=True)
  out = {choices[0]: kernel}
  current = kernel
  for src, dst in zip(choices[:-1], choices[1:]):
    current = _crop(current, dst)
    if transforms is not None:
      flat = current.reshape(dst * dst, -1)  # [(kh, kw) row-major, C]
      current = (transforms[transform_name(src, dst)] @ flat).reshape(current.shape)
    out[dst] = current
  return out


class DepthwiseConv(nn.Module):
  """Dense depthwise conv (kernel [k, k, 1, C], no bias)."""
  kernel_size: int
  stride: int = 1
  impl: str = "shift"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", CONV_INIT, (self.kernel_size, self.kernel_size, 1,
                                                 x.shape[-1]))
    return depthwise_conv2d(x, kernel, self.stride, self.impl)


class ElasticDepthwiseConv(nn.Module):
  """Depthwise conv with an elastic kernel size (centred crop of the largest kernel).

  With ``transform`` the smaller kernels go through OFA's learned transform matrices
  (identity-initialised, one per consecutive pair of sizes, shared by all channels). The chosen
  kernel is zero-padded back to the largest size, so one compiled conv serves every size.
  """
  kernel_choices: Sequence[int] = (3, 5, 7)
  stride: int = 1
  transform: bool = True
  impl: str = "shift"

  @nn.compact
  def __call__(self, x, kernel_size=None):
    choices = sorted(self.kernel_choices)
    kmax = choices[-1]
    kernel = self.param("kernel", CONV_INIT, (kmax, kmax, 1, x.shape[-1]))
    transforms = self._transforms(choices)
    if kernel_size is None or len(choices) == 1:
      return depthwise_conv2d(x, kernel, self.stride, self.impl)
    kernels = active_depthwise_kernels(kernel, choices, transforms)
    padded = [jnp.pad(kernels[k], [((kmax - k) // 2,) * 2] * 2 + [(0, 0)] * 2) for k in choices]
    index = jnp.searchsorted(jnp.asarray(choices), kernel_size)
    return depthwise_conv2d(x, jnp.stack(padded)[index], self.stride, self.impl)

  def _transforms(self, choices):
    if not self.transform:
      return None
    out = {}
    for src, dst in zip(choices[::-1][:-1], choices[::-1][1:]):
      name = transform_name(src, dst)
      out[name] = self.param(name, lambda _, n: jnp.eye(n, dtype=jnp.float32), dst * dst)
    return out

  @staticmethod
  def slice_variables(tree, channels: int, kernel_size: int, kernel_choices: Sequence[int]):
    transforms = {k: v for k, v in tree.items() if k.startswith("transform_")} or None
    kernels = active_depthwise_kernels(tree["kernel"], kernel_choices, transforms)
    return {"kernel": kernels[kernel_size][..., :channels]}


# --------------------------------------------------------------------------- squeeze-excite


def se_channels(channels, reduction: int = 4):
  """OFA's SE hidden width: make_divisible(channels // 4, 8) (works on traced ints)."""
  return make_divisible(channels // reduction, 8)


class ElasticSqueezeExcite(nn.Module):
  """SE whose hidden width follows the active channel count (OFA's DynamicSE)."""

  @nn.compact
  def __call__(self, x, active=None):
    c = x.shape[-1]
    hidden_max = se_channels(c)
    pooled = jnp.mean(x, axis=(1, 2))
    hidden = nn.Dense(hidden_max, kernel_init=CONV_INIT, name="reduce")(pooled)
    hidden_active = None if active is None else se_channels(active)
    hidden = jax.nn.relu(hidden) * channel_mask(hidden_active, hidden_max)
    gate = h_sigmoid(nn.Dense(c, kernel_init=CONV_INIT, name="expand")(hidden))
    return x * gate[:, None, None, :]

  @staticmethod
  def slice_variables(tree, channels: int):
    hidden = se_channels(channels)
    return {"reduce": {"kernel": tree["reduce"]["kernel"][:channels, :hidden],
                       "bias": tree["reduce"]["bias"][:hidden]},
            "expand": {"kernel": tree["expand"]["kernel"][:hidden, :channels],
                       "bias": tree["expand"]["bias"][:channels]}}


class SqueezeExcite(nn.Module):
  """Dense twin of :class:`ElasticSqueezeExcite`."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    hidden = jax.nn.relu(nn.Dense(se_channels(c), kernel_init=CONV_INIT, name="reduce")(jnp.mean(x, axis=(1, 2))))
    return x * h_sigmoid(nn.Dense(c, kernel_init=CONV_INIT, name="expand")(hidden))[:, None, None, :]


# --------------------------------------------------------------------------- MBConv


class BlockSpec(NamedTuple):
  """Static description of one dense inverted-residual block."""
  name: str
  in_channels: int
  mid_channels: int
  out_channels: int
  kernel_size: int
  stride: int
  act: str
  use_se: bool
  has_expand: bool   # False for expand ratio 1 (depthwise runs on the input directly)
  residual: bool


class MBConv(nn.Module):
  """Dense inverted-residual block (MobileNetV2/V3)."""
  spec: BlockSpec
  depthwise_impl: str = "shift"

  @nn.compact
  def __call__(self, x, train: bool):
    s = self.spec
    act = ACTIVATIONS[s.act]
    y = x
    if s.has_expand:
      y = ConvBN(s.mid_channels, act=s.act, name="expand")(y, train)
    y = DepthwiseConv(s.kernel_size, s.stride, self.depthwise_impl, name="depthwise")(y)
    y = act(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name="depthwise_bn")(y))
    if s.use_se:
      y = SqueezeExcite(name="se")(y)
    y = ConvBN(s.out_channels, act="identity", name="project")(y, train)
    return x + y if s.residual else y


class ElasticMBConv(nn.Module):
  """Inverted-residual block with elastic middle width, kernel size and output width.

  ``mid_channels`` / ``out_channels`` are the maximum widths. At call time ``mid_active``,
  ``kernel_size`` and ``out_active`` (traced ints, or None for the maximum) pick the subnet;
  the input's inactive channels are already zero.
  With ``residual`` the caller guarantees the
  input's active width equals ``out_active`` (slimmable nets tie them to one width group).
  """
  mid_channels: int
  out_channels: int
  kernel_choices: Sequence[int] = (3,)
  stride: int = 1
  act: str = "relu"
  use_se: bool = False
  has_expand: bool = True
  residual: bool = False
  kernel_transform: bool = True
  depthwise_impl: str = "shift"

  @nn.compact
  def __call__(self, x, train: bool, mid_active=None, kernel_size=None, out_active=None):
    act = ACTIVATIONS[self.act]
    mid_mask = channel_mask(mid_active, self.mid_channels)
    if not self.has_expand and x.shape[-1] != self.mid_channels:
      raise ValueError(f"a block without expand conv runs its depthwise on the input, so "
                       f"mid_channels ({self.mid_channels}) must equal the input's channels "
                       f"({x.shape[-1]})")
    y = x
    if self.has_expand:
      y = ElasticConvBN(self.mid_channels, act=self.act, name="expand")(y, train, mid_active)
    y = ElasticDepthwiseConv(self.kernel_choices, self.stride, self.kernel_transform,
                             self.depthwise_impl, name="depthwise")(y, kernel_size)
    y = act(ElasticBatchNorm(name="depthwise_bn")(y, train, mid_mask))
    if self.use_se:
      y = ElasticSqueezeExcite(name="se")(y, mid_active)
    y = ElasticConvBN(self.out_channels, act="identity", name="project")(y, train, out_active)
    return x + y if self.residual else y

  def slice_variables(self, variables: dict, spec: BlockSpec) -> dict:
    """Slices this block's {'params': ..., 'batch_stats': ...} down to ``spec``'s sizes."""
    p, bs = variables["params"], variables["batch_stats"]
    mid, out, cin = spec.mid_channels, spec.out_channels, spec.in_channels
    params, stats = {}, {}
    if spec.has_expand:
      params["expand"] = ElasticConvBN.slice_variables(p["expand"], cin, mid)
      stats["expand"] = {"bn": {k: v[:mid] for k, v in bs["expand"]["bn"].items()}}
    params["depthwise"] = ElasticDepthwiseConv.slice_variables(
        p["depthwise"], mid, spec.kernel_size, self.kernel_choices)
    params["depthwise_bn"] = {k: v[:mid] for k, v in p["depthwise_bn"].items()}
    stats["depthwise_bn"] = {k: v[:mid] for k, v in bs["depthwise_bn"].items()}
    if spec.use_se:
      params["se"] = ElasticSqueezeExcite.slice_variables(p["se"], mid)
    params["project"] = ElasticConvBN.slice_variables(p["project"], mid, out)
    stats["project"] = {"bn": {k: v[:out] for k, v in bs["project"]["bn"].items()}}
    return {"params": params, "batch_stats": stats}


def spatial_taps(size: int, kernel, stride: int, exclude_padding: bool = False):
  """Multiply-adds per channel pair of a k x k conv on a size x size input: output positions x
  taps. OFA counts every tap; XLA's cost analysis skips taps that land on the zero padding
  (``exclude_padding=True``, static ints only)."""
  out = (size - 1) // stride + 1  # conv_output_size for any odd kernel with pad k // 2
  if not exclude_padding:
    return out * out * kernel * kernel
  pad = kernel // 2
  per_axis = sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride - pad + t < size)
  return per_axis * per_axis


def mbconv_cost(spec: Any, hw: int, exclude_padding: bool = False):
  """OFA-convention MACs and params of one block given as a BlockSpec-like object whose
  channel / kernel fields may be traced ints; ``hw`` is the (static) input size."""
  out_hw = (hw - 1) // spec.stride + 1
  cin, mid, cout, k = spec.in_channels, spec.mid_channels, spec.out_channels, spec.kernel_size
  macs = 0
  params = 0
  if spec.has_expand:
    macs = macs + hw * hw * cin * mid
    params = params + cin * mid + 2 * mid
  macs = macs + spatial_taps(hw, k, spec.stride, exclude_padding) * mid
  params = params + k * k * mid + 2 * mid
  if spec.use_se:
    hidden = se_channels(mid)
    macs = macs + 2 * mid * hidden
    params = params + 2 * mid * hidden + hidden + mid
  macs = macs + out_hw * out_hw * mid * cout
  params = params + mid * cout + 2 * cout
  return macs, params
