"""Elastic CNN layers (BatchNorm, conv-BN, depthwise, squeeze-excite, MBConv) and their dense twins.

Parameters are at maximum shape and active sizes are traced arguments. Every elastic module has a
dense twin with the same parameter names, so exporting a subnet is slicing (see each elastic
module's ``slice_variables``). Width is a prefix mask over channels; inactive channels are
multiplied to exactly zero after every layer that could make them non-zero (BatchNorm's bias, a
conv bias, SE's gate), so they never leak into the next layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ofajax.layers.common import ACTIVATIONS, CONV_INIT, channel_mask, h_sigmoid, make_divisible
from ofajax.layers.conv import conv2d, depthwise_conv2d, spatial_taps
from ofajax.layers.stats import slice_bn


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


class _ConvBNBase(nn.Module):
  """Conv (k x k) -> BN -> activation: the fields and the conv both twins share."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  act: str = "relu"

  def _conv(self, x):
    kernel = self.param("kernel", CONV_INIT, (self.kernel_size, self.kernel_size, x.shape[-1],
                                                 self.features))
    return conv2d(x, kernel, self.stride)


class ElasticConvBN(_ConvBNBase):
  """Conv (k x k) -> BN -> activation with an elastic number of output channels."""

  @nn.compact
  def __call__(self, x, train: bool, out_active=None):
    mask = channel_mask(out_active, self.features)
    y = ElasticBatchNorm(name="bn")(self._conv(x), train, mask)
    return ACTIVATIONS[self.act](y)  # every activation here maps 0 to 0, so no second mask

  @staticmethod
  def slice_variables(tree, in_active: int, out_active: int):
    """This layer's params cut to ``in_active`` inputs and ``out_active`` outputs."""
    return {"kernel": tree["kernel"][:, :, :in_active, :out_active],
            "bn": slice_bn(tree["bn"], out_active)}


class ConvBN(_ConvBNBase):
  """Dense twin of :class:`ElasticConvBN`."""

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     name="bn")(self._conv(x))
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

  def slice_variables(self, params: dict, spec: BlockSpec) -> dict:
    """This block's params cut to ``spec``'s sizes (kernel transforms baked in); the batch
    statistics follow with :func:`ofajax.layers.stats.with_stats`."""
    mid, out, cin = spec.mid_channels, spec.out_channels, spec.in_channels
    sliced = {}
    if spec.has_expand:
      sliced["expand"] = ElasticConvBN.slice_variables(params["expand"], cin, mid)
    sliced["depthwise"] = ElasticDepthwiseConv.slice_variables(
        params["depthwise"], mid, spec.kernel_size, self.kernel_choices)
    sliced["depthwise_bn"] = slice_bn(params["depthwise_bn"], mid)
    if spec.use_se:
      sliced["se"] = ElasticSqueezeExcite.slice_variables(params["se"], mid)
    sliced["project"] = ElasticConvBN.slice_variables(params["project"], mid, out)
    return sliced


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
