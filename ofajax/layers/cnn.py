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

from ofajax.layers.branching import pad_channels, switch_widths
from ofajax.layers.common import ACTIVATIONS, CONV_INIT, channel_mask, h_sigmoid, make_divisible
from ofajax.layers.conv import (conv2d, crop_kernel, depthwise_conv2d, depthwise_conv2d_choice,
                                spatial_taps)
from ofajax.layers.stats import slice_bn


# --------------------------------------------------------------------------- batch norm


class ElasticBatchNorm(nn.Module):
  """BatchNorm over the active channels; same names and formula as ``nn.BatchNorm``.

  Training normalises with the batch statistics of the subnet being run. Running statistics
  are only updated for active channels, only when ``update`` is true (a caller may freeze a
  layer's statistics) and only when "batch_stats" is mutable;
  ``ofajax.bn.calibrate_bn`` re-estimates them per subnet from the sown batch moments.

  Active channels are either marked by ``mask`` (masked execution: ``x`` has all ``size``
  channels) or are all of ``x``'s channels, a prefix of the ``size`` this layer holds
  (active-size execution: ``x`` is narrower and only that prefix is read and updated).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  size: int = 0   # channels held; 0: x's channel count

  @nn.compact
  def __call__(self, x, train: bool, mask=None, update=True):
    size = self.size or x.shape[-1]
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (size,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (size,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((size,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((size,), jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
      keep = jnp.asarray(update, bool)
      if mask is not None:
        keep = keep & (mask > 0)
      if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
        m = self.momentum
        ra_mean.value = _set_prefix(ra_mean.value, jnp.where(
            keep, m * ra_mean.value[:c] + (1 - m) * mean, ra_mean.value[:c]))
        ra_var.value = _set_prefix(ra_var.value, jnp.where(
            keep, m * ra_var.value[:c] + (1 - m) * var, ra_var.value[:c]))
      # Exact per-batch moments for ofajax.bn.calibrate_bn (a no-op unless it asks for them);
      # always all ``size`` channels, so every execution sows the same tree.
      self.sow("bn_moments", "mean", _set_prefix(ra_mean.value, jnp.where(keep, mean,
                                                                          ra_mean.value[:c])))
      self.sow("bn_moments", "var", _set_prefix(ra_var.value, jnp.where(keep, var,
                                                                        ra_var.value[:c])))
    else:
      mean, var = ra_mean.value[:c], ra_var.value[:c]
    y = (x - mean) * (lax.rsqrt(var + self.epsilon) * scale[:c]) + bias[:c]
    return y if mask is None else y * mask


def _set_prefix(full, prefix):
  """``full`` with its first ``len(prefix)`` entries replaced (``prefix`` itself when as long)."""
  if prefix.shape[0] == full.shape[0]:
    return prefix
  return jnp.concatenate([prefix, full[prefix.shape[0]:]])


# --------------------------------------------------------------------------- conv + bn + act


class _ConvBNBase(nn.Module):
  """Conv (k x k) -> BN -> activation: the fields and the conv both twins share."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  act: str = "relu"
  in_features: int = 0   # input channels held; 0: x's channel count

  def _conv(self, x, width=None, in_features=None):
    """The conv from x's channels (a prefix of ``in_features``, else of the field) to the first
    ``width`` outputs (all when None)."""
    in_features = in_features or self.in_features or x.shape[-1]
    kernel = self.param("kernel", CONV_INIT, (self.kernel_size, self.kernel_size, in_features,
                                                 self.features))
    return conv2d(x, kernel[:, :, :x.shape[-1], :width], self.stride)


class ElasticConvBN(_ConvBNBase):
  """Conv (k x k) -> BN -> activation with an elastic number of output channels.

  With ``execution="active"`` and ``branch_widths`` ((in, out) static widths, cheapest first,
  the last the full layer) it runs at the cheapest branch holding the traced widths and returns
  the output zero-padded to ``features`` (see :mod:`ofajax.layers.branching`).
  """
  branch_widths: Sequence[tuple[int, int]] = ()
  execution: str = "masked"   # or "active"

  @nn.compact
  def __call__(self, x, train: bool, out_active=None, width=None, in_active=None):
    """``out_active`` (traced) masks the outputs; a static ``width`` computes only that many
    (active-size execution). ``in_active`` (traced, active execution only) picks the branch
    together with ``out_active``; x's channels beyond it are zero."""
    if self.execution == "active" and len(self.branch_widths) > 1 and not self.is_initializing():
      cin = self.in_features or x.shape[-1]
      return switch_widths(
          self, (in_active, out_active), self.branch_widths,
          lambda mdl, x, out, w: pad_channels(mdl.layer(x[..., :w[0]], train, out, w[1], cin),
                                              self.features), x, out_active)
    return self.layer(x, train, out_active, width)

  def layer(self, x, train, out_active, width=None, in_features=None):
    """Conv-BN-activation at the static ``width`` (all when None), masked at ``out_active``."""
    mask = (channel_mask(out_active, self.features) if width is None else
            None if out_active is None else channel_mask(out_active, width))
    y = ElasticBatchNorm(size=self.features, name="bn")(self._conv(x, width, in_features), train,
                                                        mask)
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


def transform_name(src: int, dst: int) -> str:
  return f"transform_{src}to{dst}"


def active_depthwise_kernels(kernel, kernel_choices: Sequence[int], transforms: dict | None):
  """Kernels for every choice, largest first, each k x k: OFA's centred crop, optionally through
  the learned k^2 x k^2 transform (OFA applies ``flat @ M.T`` per channel, chaining 7->5->3)."""
  choices = sorted(kernel_choices, reverse=True)
  out = {choices[0]: kernel}
  current = kernel
  for src, dst in zip(choices[:-1], choices[1:]):
    current = crop_kernel(current, dst)
    if transforms is not None:
      flat = current.reshape(dst * dst, -1)  # [(kh, kw) row-major, C]
      current = (transforms[transform_name(src, dst)] @ flat).reshape(current.shape)
    out[dst] = current
  return out


def padded_choice(kernel, kernel_choices: Sequence[int], transforms: dict | None, size):
  """(the kernel of (traced) ``size`` among :func:`active_depthwise_kernels`, zero-padded back
  to the largest choice, and its index in the ascending choices): one program for every size."""
  choices = sorted(kernel_choices)
  kmax = choices[-1]
  kernels = active_depthwise_kernels(kernel, choices, transforms)
  padded = jnp.stack([jnp.pad(kernels[k], [((kmax - k) // 2,) * 2] * 2 + [(0, 0)] * 2)
                      for k in choices])
  index = jnp.searchsorted(jnp.asarray(choices), size)
  return padded[index], index


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
  kernel is zero-padded back to the largest size, so one compiled function serves every size:
  masked execution convolves with the padded kernel; active-size execution
  (``execution="active"``) convolves at the chosen size only (``depthwise_conv2d_choice``).
  ``x`` may hold a prefix of the ``channels`` this layer holds (active-size execution).
  """
  kernel_choices: Sequence[int] = (3, 5, 7)
  stride: int = 1
  transform: bool = True
  impl: str = "shift"
  channels: int = 0          # channels held; 0: x's channel count
  execution: str = "masked"  # or "active"

  @nn.compact
  def __call__(self, x, kernel_size=None):
    choices = sorted(self.kernel_choices)
    kmax = choices[-1]
    kernel = self.param("kernel", CONV_INIT, (kmax, kmax, 1, self.channels or x.shape[-1]))
    kernel = kernel[..., :x.shape[-1]]
    transforms = self._transforms(choices)
    if kernel_size is None or len(choices) == 1:
      return depthwise_conv2d(x, kernel, self.stride, self.impl)
    chosen, index = padded_choice(kernel, choices, transforms, kernel_size)
    if self.execution == "active":
      return depthwise_conv2d_choice(x, chosen, index, choices, self.stride, self.impl)
    return depthwise_conv2d(x, chosen, self.stride, self.impl)

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


class PrefixDense(nn.Module):
  """``nn.Dense``'s parameters (same names, shapes and init) applied to the first
  ``x.shape[-1]`` inputs and the first ``width`` outputs (all when None)."""
  in_features: int
  features: int

  @nn.compact
  def __call__(self, x, width=None):
    kernel = self.param("kernel", CONV_INIT, (self.in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    kernel, bias = kernel[:x.shape[-1], :width], bias[:width]
    return jnp.dot(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)


class ElasticSqueezeExcite(nn.Module):
  """SE whose hidden width follows the active channel count (OFA's DynamicSE).

  Masked execution: ``x`` has all ``channels`` and ``active`` (traced) counts the active ones.
  Active-size execution: ``x`` holds a static prefix, of which ``active`` (traced, or None for
  all of it) are active.
  """
  channels: int = 0   # channels held; 0: x's channel count

  @nn.compact
  def __call__(self, x, active=None):
    c = self.channels or x.shape[-1]
    hidden_max = se_channels(c)
    narrow = x.shape[-1] < c
    pooled = jnp.mean(x, axis=(1, 2))
    hidden = jax.nn.relu(PrefixDense(c, hidden_max, name="reduce")(
        pooled, se_channels(x.shape[-1]) if narrow else None))
    if active is not None or not narrow:
      hidden = hidden * channel_mask(None if active is None else se_channels(active),
                                     hidden.shape[-1])
    gate = h_sigmoid(PrefixDense(hidden_max, c, name="expand")(hidden, x.shape[-1]))
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

  ``execution="masked"`` computes every layer at its maximum width and zeroes the inactive
  channels. ``execution="active"`` computes only (about) the active subnet: a ``switch`` over
  ``branch_widths``, static (in, mid, out) widths, cheapest first, the last the full block (see
  :mod:`ofajax.layers.branching`). Each branch slices the maximum-shape parameters to its
  widths, so gradients land in the prefix that masking trains, and runs the depthwise conv at
  the chosen kernel size only. With ``bucketed`` a branch may be wider than the active widths
  and masks the remainder (per-layer widths: slimmable nets); without, the branches are the
  exact middle widths (OFA's expand ratios). Both executions give the same numbers.
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
  branch_widths: Sequence[tuple[int, int, int]] = ()   # active execution's (in, mid, out) widths
  bucketed: bool = False            # branches are buckets: mask the active widths inside them
  execution: str = "masked"         # or "active"

  @nn.compact
  def __call__(self, x, train: bool, mid_active=None, kernel_size=None, out_active=None,
               in_active=None):
    """``in_active`` (traced, or None when the input is always full) only picks the branch:
    the input's inactive channels are already zero."""
    if not self.has_expand and x.shape[-1] != self.mid_channels:
      raise ValueError(f"a block without expand conv runs its depthwise on the input, so "
                       f"mid_channels ({self.mid_channels}) must equal the input's channels "
                       f"({x.shape[-1]})")
    if self.execution == "active" and len(self.branch_widths) > 1 and not self.is_initializing():
      masks = (mid_active, out_active) if self.bucketed else (None, out_active)
      y = switch_widths(self, (in_active, mid_active, out_active), self.branch_widths,
                        lambda mdl, x, k, mid, out, w: mdl.layers(x, train, mid, k, out, w),
                        x, kernel_size, *masks)
    else:
      y = self.layers(x, train, mid_active, kernel_size, out_active)
    return x + y if self.residual else y

  def layers(self, x, train, mid_active, kernel_size, out_active, widths=None):
    """The block without its shortcut: masked at the traced widths, or computed at the static
    (in, mid, out) ``widths`` (active-size execution; traced widths mask inside them). Returns
    all ``out_channels``."""
    act = ACTIVATIONS[self.act]
    in_width, mid_width, out_width = widths or (x.shape[-1], None, None)
    cin = x.shape[-1]
    y = x[..., :in_width]
    mid_mask = (channel_mask(mid_active, self.mid_channels) if mid_width is None else
                None if mid_active is None else channel_mask(mid_active, mid_width))
    if self.has_expand:
      y = ElasticConvBN(self.mid_channels, act=self.act, in_features=cin, name="expand")(
          y, train, mid_active, width=mid_width)
    y = ElasticDepthwiseConv(self.kernel_choices, self.stride, self.kernel_transform,
                             self.depthwise_impl, channels=self.mid_channels,
                             execution=self.execution, name="depthwise")(y, kernel_size)
    y = act(ElasticBatchNorm(size=self.mid_channels, name="depthwise_bn")(y, train, mid_mask))
    if self.use_se:
      y = ElasticSqueezeExcite(self.mid_channels, name="se")(y, mid_active)
    y = ElasticConvBN(self.out_channels, act="identity", in_features=self.mid_channels,
                      name="project")(y, train, out_active, width=out_width)
    return pad_channels(y, self.out_channels)

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
