"""Elastic CNN layers (BatchNorm, conv-BN, depthwise, squeeze-excite, MBConv) and their dense twins.

Parameters are at maximum shape and active sizes are traced arguments. Every elastic module has a
dense twin with the same parameter names, so exporting a subnet is slicing (see each elastic
module's ``slice_variables``). Width is a prefix mask over channels; inactive channels are
multiplied to exactly zero after every layer that could make them non-zero (BatchNorm's bias, a
conv bias, SE's gate), so they never leak into the next layer.

Two execution modes (``EXECUTIONS``). "masked", the reference: every layer runs at its largest
size and inactive channels are zeroed. "active": a block selects, with a traced index, among
static branches (one per middle width, and inside it one per kernel size), and each branch runs
the layers on the active prefix of the largest-shape parameters. The layers take that prefix
from the input's width: given ``features`` (the maximum) and an input with fewer channels, they
declare their parameters at full shape and use only the first ``x.shape[-1]`` channels, so the
parameter tree, checkpoints and ``slice_variables`` are the same in both modes and gradients land
in the same prefix.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ofajax.layers.common import ACTIVATIONS, CONV_INIT, channel_mask, h_sigmoid, make_divisible
from ofajax.layers.conv import conv2d, depthwise_conv2d, spatial_taps
from ofajax.layers.stats import slice_bn


# --------------------------------------------------------------------------- batch norm


EXECUTIONS = ("masked", "active")


def check_execution(mode: str) -> str:
  """``mode`` if it is one of :data:`EXECUTIONS`, else a ValueError naming them."""
  if mode not in EXECUTIONS:
    raise ValueError(f"execution must be one of {EXECUTIONS}, got {mode!r}")
  return mode


def _prefix_update(full, new):
  """``full`` with its first ``len(new)`` entries replaced by ``new``; just ``new`` at full width,
  so that the masked path's graph stays as it was."""
  width = new.shape[0]
  return new if width == full.shape[0] else jnp.concatenate([new, full[width:]])


class ElasticBatchNorm(nn.Module):
  """BatchNorm over the active channels; same names and formula as ``nn.BatchNorm``.

  Training normalises with the batch statistics of the subnet being run. Running statistics
  are only updated for active channels, only when ``update`` is true (a caller may freeze a
  layer's statistics) and only when "batch_stats" is mutable;
  ``ofajax.bn.calibrate_bn`` re-estimates them per subnet from the sown batch moments.
  Active channels are those of ``mask`` and, when ``x`` has fewer channels than ``features``
  (active execution), only its first ``x.shape[-1]``; the rest keep their statistics.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  features: int | None = None  # channels of the parameters; None: x's

  @nn.compact
  def __call__(self, x, train: bool, mask=None, update=True):
    c, width = self.features or x.shape[-1], x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)[:width]
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)[:width]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
      keep = jnp.asarray(update, bool)
      if mask is not None:
        keep = keep & (mask > 0)
      old_mean, old_var = ra_mean.value[:width], ra_var.value[:width]
      if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
        m = self.momentum
        ra_mean.value = _prefix_update(ra_mean.value,
                                       jnp.where(keep, m * old_mean + (1 - m) * mean, old_mean))
        ra_var.value = _prefix_update(ra_var.value,
                                      jnp.where(keep, m * old_var + (1 - m) * var, old_var))
      # Exact per-batch moments for ofajax.bn.calibrate_bn (a no-op unless it asks for them),
      # full width in both modes: a channel this subnet does not use sows its running value.
      self.sow("bn_moments", "mean",
               _prefix_update(ra_mean.value, jnp.where(keep, mean, ra_mean.value[:width])))
      self.sow("bn_moments", "var",
               _prefix_update(ra_var.value, jnp.where(keep, var, ra_var.value[:width])))
    else:
      mean, var = ra_mean.value[:width], ra_var.value[:width]
    y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    return y if mask is None else y * mask


# --------------------------------------------------------------------------- conv + bn + act


class _ConvBNBase(nn.Module):
  """Conv (k x k) -> BN -> activation: the fields and the conv both twins share."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  act: str = "relu"

  def _conv(self, x, in_features=None, out_width=None):
    """The kernel is [k, k, in_features (default: x's), features]; its prefix
    [:, :, :x's channels, :out_width] convolves (the whole of it unless execution is active)."""
    kernel = self.param("kernel", CONV_INIT, (self.kernel_size, self.kernel_size,
                                                 in_features or x.shape[-1], self.features))
    return conv2d(x, kernel[:, :, :x.shape[-1], :out_width], self.stride)


class ElasticConvBN(_ConvBNBase):
  """Conv (k x k) -> BN -> activation with an elastic number of output channels.

  Masked: ``out_active`` (traced) zeroes the inactive outputs. Active execution: only the first
  ``out_width`` (static) outputs are computed, and ``x`` may hold only the first of the
  ``in_features`` input channels the kernel is declared with.
  """
  in_features: int | None = None  # input channels of the kernel; None: x's

  @nn.compact
  def __call__(self, x, train: bool, out_active=None, out_width: int | None = None):
    mask = channel_mask(out_active, out_width or self.features)
    y = ElasticBatchNorm(features=self.features, name="bn")(
        self._conv(x, self.in_features, out_width), train, mask)
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


def _depthwise_at(size: int, choices: Sequence[int], stride: int, impl: str, x, kernel,
                  transforms):
  """The depthwise conv at kernel ``size`` (one static branch of active execution)."""
  return depthwise_conv2d(x, active_depthwise_kernels(kernel, choices, transforms)[size], stride,
                          impl)


class ElasticDepthwiseConv(nn.Module):
  """Depthwise conv with an elastic kernel size (centred crop of the largest kernel).

  With ``transform`` the smaller kernels go through OFA's learned transform matrices
  (identity-initialised, one per consecutive pair of sizes, shared by all channels). Masked, the
  chosen kernel is zero-padded back to the largest size, so one compiled conv serves every size.
  With ``kernel_branches`` (active execution) ``lax.switch`` picks one conv per size instead, so
  a 3x3 kernel costs 9 taps rather than 49, and ``x`` may hold only the first of ``features``
  channels.
  """
  kernel_choices: Sequence[int] = (3, 5, 7)
  stride: int = 1
  transform: bool = True
  impl: str = "shift"
  features: int | None = None  # channels of the kernel; None: x's
  kernel_branches: bool = False

  @nn.compact
  def __call__(self, x, kernel_size=None):
    choices = sorted(self.kernel_choices)
    kmax = choices[-1]
    kernel = self.param("kernel", CONV_INIT, (kmax, kmax, 1, self.features or x.shape[-1]))
    kernel = kernel[..., :x.shape[-1]]
    transforms = self._transforms(choices)
    if kernel_size is None or len(choices) == 1:
      return depthwise_conv2d(x, kernel, self.stride, self.impl)
    index = jnp.searchsorted(jnp.asarray(choices), kernel_size)
    if self.kernel_branches:
      branches = [functools.partial(_depthwise_at, k, choices, self.stride, self.impl)
                  for k in choices]
      return lax.switch(index, branches, x, kernel, transforms)
    kernels = active_depthwise_kernels(kernel, choices, transforms)
    padded = [jnp.pad(kernels[k], [((kmax - k) // 2,) * 2] * 2 + [(0, 0)] * 2) for k in choices]
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


class _PrefixDense(nn.Module):
  """``nn.Dense``'s parameters (same names, shapes and initialisation, so a checkpoint does not
  see the difference) applied as their prefix: kernel [:x's width, :out_width]."""
  features: int
  in_features: int

  @nn.compact
  def __call__(self, x, out_width: int):
    kernel = self.param("kernel", CONV_INIT, (self.in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return x @ kernel[:x.shape[-1], :out_width] + bias[:out_width]


class ElasticSqueezeExcite(nn.Module):
  """SE whose hidden width follows the active channel count (OFA's DynamicSE).

  Masked: ``active`` (traced) masks the hidden units beyond ``se_channels(active)``. Active
  execution: ``x`` holds only the first of ``features`` channels, and the hidden width is that
  width's (static), so both dense layers run at their active size.
  """
  features: int | None = None  # channels of the parameters; None: x's

  @nn.compact
  def __call__(self, x, active=None):
    c, width = self.features or x.shape[-1], x.shape[-1]
    hidden_max, hidden_width = se_channels(c), se_channels(width)
    pooled = jnp.mean(x, axis=(1, 2))
    hidden = _PrefixDense(hidden_max, c, name="reduce")(pooled, hidden_width)
    hidden_active = None if active is None else se_channels(active)
    hidden = jax.nn.relu(hidden) * channel_mask(hidden_active, hidden_width)
    gate = h_sigmoid(_PrefixDense(c, hidden_max, name="expand")(hidden, width))
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

  ``execution="active"`` runs the block at its active middle width: ``nn.switch`` over one
  static branch per width of ``mid_choices`` (``mid_active`` must be one of them), each with a
  ``lax.switch`` over the kernel sizes inside its depthwise conv. The output width stays masked.
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
  mid_choices: Sequence[int] = ()  # active execution's middle widths (with mid_channels)
  execution: str = "masked"

  def __post_init__(self):
    check_execution(self.execution)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool, mid_active=None, kernel_size=None, out_active=None):
    if not self.has_expand and x.shape[-1] != self.mid_channels:
      raise ValueError(f"a block without expand conv runs its depthwise on the input, so "
                       f"mid_channels ({self.mid_channels}) must equal the input's channels "
                       f"({x.shape[-1]})")
    if self.execution == "masked":
      return self._body(x, train, None, mid_active, kernel_size, out_active)
    if os.environ.get('EXP') == 'E2':
      return self._body2(x, train, mid_active, kernel_size, out_active)
    mids = sorted(set(self.mid_choices) | {self.mid_channels})
    if mid_active is None or len(mids) == 1 or self.is_initializing():
      # One static width. At init this declares every parameter at its full shape (the
      # branches of nn.switch must not create variables).
      return self._body(x, train, self.mid_channels, None, kernel_size, out_active)
    branches = [functools.partial(_mid_branch, width=m, train=train) for m in mids]
    index = jnp.searchsorted(jnp.asarray(mids), mid_active)
    return nn.switch(index, branches, self, x, kernel_size, out_active)

  def _body2(self, x, train, mid_active, kernel_size, out_active):
    mid = self.mid_channels
    y = x
    if self.has_expand:
      y = ElasticConvBN(mid, act=self.act, name="expand")(y, train, mid_active)
    y = ElasticDepthwiseConv(self.kernel_choices, self.stride, self.kernel_transform,
                             self.depthwise_impl, features=mid, kernel_branches=True,
                             name="depthwise")(y, kernel_size)
    mid_mask = channel_mask(mid_active, mid)
    y = ACTIVATIONS[self.act](ElasticBatchNorm(features=mid, name="depthwise_bn")(y, train, mid_mask))
    if self.use_se:
      y = ElasticSqueezeExcite(features=mid, name="se")(y, mid_active)
    y = ElasticConvBN(self.out_channels, act="identity", in_features=mid, name="project")(y, train, out_active)
    return x + y if self.residual else y

  def _body(self, x, train: bool, width: int | None, mid_active, kernel_size, out_active):
    """The block at the static middle width ``width`` (active execution), or at full width
    with the middle channels beyond ``mid_active`` masked (``width=None``)."""
    mid = self.mid_channels
    masked = width is None
    y = x
    if self.has_expand:
      y = ElasticConvBN(mid, act=self.act, name="expand")(
          y, train, mid_active if masked else None, out_width=width)
    y = ElasticDepthwiseConv(self.kernel_choices, self.stride, self.kernel_transform,
                             self.depthwise_impl, features=mid, kernel_branches=(not masked) if os.environ.get('EXP') != 'E1' else False,
                             name="depthwise")(y, kernel_size)
    mid_mask = channel_mask(mid_active, mid) if masked else None
    y = ACTIVATIONS[self.act](ElasticBatchNorm(features=mid, name="depthwise_bn")(
        y, train, mid_mask))
    if self.use_se:
      y = ElasticSqueezeExcite(features=mid, name="se")(y, mid_active if masked else None)
    y = ElasticConvBN(self.out_channels, act="identity", in_features=mid, name="project")(
        y, train, out_active)
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


def _mid_branch(block: ElasticMBConv, x, kernel_size, out_active, *, width: int, train: bool):
  """One ``nn.switch`` branch of an active-execution block: its body at middle width ``width``."""
  return block._body(x, train, width, None, kernel_size, out_active)  # pylint: disable=protected-access


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
