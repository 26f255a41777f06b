"""Bottleneck-ResNet layers of OFA-ResNet50: elastic bottlenecks, their dense twins, the optional
residual stem conv, and PyTorch's pooling.

Structure as OFA's reference ``ResNetBottleneckBlock`` (once-for-all, ``ofa/utils/layers.py``)
defines it, which follows ResNet-D (He et al., "Bag of Tricks", CVPR 2019): 1x1 conv -> 3x3 conv
(carries the stride) -> 1x1 conv (BN, no activation), plus a shortcut, then ReLU. The shortcut is
the identity when the stride is 1 and the widths match, otherwise ``avg_pool(stride, ceil_mode)
-> 1x1 conv -> BN`` (OFA's ``avgpool_conv`` mode). The middle width of a bottleneck follows its
*output* width (OFA: ``make_divisible(round(out * expand_ratio), 8)``), not its input width as in
MobileNets.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ofajax.layers.branching import pad_channels, switch_widths
from ofajax.layers.cnn import ConvBN, ElasticConvBN


class BottleneckSpec(NamedTuple):
  """Static description of one dense bottleneck block."""
  name: str
  in_channels: int
  mid_channels: int
  out_channels: int
  stride: int
  downsample: bool   # avg-pool + 1x1 conv shortcut; False: identity shortcut


# --------------------------------------------------------------------------- pooling


def max_pool_3x3_s2(x):
  """PyTorch's MaxPool2d(3, stride=2, padding=1): padding never wins the max."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                           ((0, 0), (1, 1), (1, 1), (0, 0)))


def avg_pool_ceil(x, stride: int):
  """PyTorch's AvgPool2d(stride, stride, padding=0, ceil_mode=True): on an odd-sized input the
  last window hangs over the edge and averages only the pixels it covers."""
  if stride == 1:
    return x
  h, w = x.shape[1], x.shape[2]
  pad = ((0, 0), (0, -h % stride), (0, -w % stride), (0, 0))
  window, strides = (1, stride, stride, 1), (1, stride, stride, 1)
  total = lax.reduce_window(x, 0.0, lax.add, window, strides, pad)
  count = lax.reduce_window(jnp.ones((1, h, w, 1), x.dtype), 0.0, lax.add, window, strides, pad)
  return total / count


def pooled_size(size: int, stride: int) -> int:
  """Output size of a stride-s 3x3 conv (pad 1), of the ceil-mode avg pool and of the max pool."""
  return (size - 1) // stride + 1


# --------------------------------------------------------------------------- blocks


class ElasticBottleneck(nn.Module):
  """Bottleneck with elastic middle and output widths (OFA's DynamicResNetBottleneckBlock).

  ``mid_channels`` / ``out_channels`` are the maximum widths; ``mid_active`` / ``out_active``
  (traced ints, or None for the maximum) pick the subnet. The input's inactive channels are
  already zero; with an identity shortcut the caller guarantees its active width equals
  ``out_active`` (OFA ties both to the stage's width multiplier).

  ``execution="active"`` switches among ``branch_widths``, static (in, mid, out) widths,
  cheapest first, the last the full block, masking the active widths inside the chosen one
  (see :mod:`ofajax.layers.branching`); ``in_active`` then helps pick the branch.
  """
  mid_channels: int
  out_channels: int
  stride: int = 1
  downsample: bool = False
  branch_widths: Sequence[tuple[int, int, int]] = ()
  execution: str = "masked"   # or "active"

  @nn.compact
  def __call__(self, x, train: bool, mid_active=None, out_active=None, in_active=None):
    if self.execution == "active" and len(self.branch_widths) > 1 and not self.is_initializing():
      return switch_widths(self, (in_active, mid_active, out_active), self.branch_widths,
                           lambda mdl, x, mid, out, w: mdl.layers(x, train, mid, out, w),
                           x, mid_active, out_active)
    return self.layers(x, train, mid_active, out_active)

  def layers(self, x, train, mid_active, out_active, widths=None):
    """The block, masked at the traced widths, or at the static (in, mid, out) ``widths`` with
    the traced ones masked inside; returns all ``out_channels``."""
    cin = x.shape[-1]
    in_width, mid_width, out_width = widths or (cin, None, None)
    xs = x[..., :in_width]
    if self.downsample:
      shortcut = ElasticConvBN(self.out_channels, act="identity", in_features=cin,
                               name="downsample")(avg_pool_ceil(xs, self.stride), train,
                                                  out_active, width=out_width)
    else:   # identity: in and out are one width group, so x is zero beyond out_width
      shortcut = x[..., :out_width]
    y = ElasticConvBN(self.mid_channels, 1, 1, "relu", in_features=cin, name="conv1")(
        xs, train, mid_active, width=mid_width)
    y = ElasticConvBN(self.mid_channels, 3, self.stride, "relu", in_features=self.mid_channels,
                      name="conv2")(y, train, mid_active, width=mid_width)
    y = ElasticConvBN(self.out_channels, 1, 1, "identity", in_features=self.mid_channels,
                      name="conv3")(y, train, out_active, width=out_width)
    return pad_channels(jax.nn.relu(y + shortcut), self.out_channels)

  @staticmethod
  def slice_variables(params: dict, spec: BottleneckSpec) -> dict:
    """One block's params cut to ``spec``'s widths; the batch statistics follow with
    :func:`ofajax.layers.stats.with_stats`."""
    cin, mid, out = spec.in_channels, spec.mid_channels, spec.out_channels
    convs = [("conv1", cin, mid), ("conv2", mid, mid), ("conv3", mid, out)]
    if spec.downsample:
      convs.append(("downsample", cin, out))
    return {n: ElasticConvBN.slice_variables(params[n], i, o) for n, i, o in convs}


class Bottleneck(nn.Module):
  """Dense twin of :class:`ElasticBottleneck` (same parameter names)."""
  spec: BottleneckSpec

  @nn.compact
  def __call__(self, x, train: bool):
    s = self.spec
    shortcut = x
    if s.downsample:
      shortcut = ConvBN(s.out_channels, act="identity", name="downsample")(
          avg_pool_ceil(x, s.stride), train)
    y = ConvBN(s.mid_channels, 1, 1, "relu", name="conv1")(x, train)
    y = ConvBN(s.mid_channels, 3, s.stride, "relu", name="conv2")(y, train)
    y = ConvBN(s.out_channels, 1, 1, "identity", name="conv3")(y, train)
    return jax.nn.relu(y + shortcut)


class ElasticResidualConv(nn.Module):
  """OFA-ResNet's optional stem layer: ``x + relu(bn(conv3x3(x)))`` at an elastic width
  (``branch_widths`` / ``execution``: the conv's, see :class:`ElasticConvBN`)."""
  features: int
  branch_widths: Sequence[tuple[int, int]] = ()
  execution: str = "masked"

  @nn.compact
  def __call__(self, x, train: bool, active=None):
    return x + ElasticConvBN(self.features, 3, 1, "relu", branch_widths=self.branch_widths,
                             execution=self.execution, name="conv")(x, train, active,
                                                                    in_active=active)


class ResidualConv(nn.Module):
  """Dense twin of :class:`ElasticResidualConv`."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    return x + ConvBN(self.features, 3, 1, "relu", name="conv")(x, train)
