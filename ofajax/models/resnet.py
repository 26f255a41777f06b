"""Bottleneck ResNets with a ResNet-D stem: the elastic blocks of OFA-ResNet50, their dense twins,
the dense network every exported subnet becomes, and the shared cost formula.

Structure as OFA's reference ``ResNets`` / ``ResNetBottleneckBlock`` (once-for-all,
``ofa/imagenet_classification/networks/resnets.py`` and ``ofa/utils/layers.py``) define it, which
follows ResNet-D (He et al., "Bag of Tricks", CVPR 2019):

* stem: three 3x3 conv-BN-ReLU layers (stride 2, 1, 1); in OFA the middle one is a residual
  block (``x + relu(bn(conv(x)))``) that a subnet may skip; then a 3x3 stride-2 max pool
  (padding 1).
* bottleneck: 1x1 conv -> 3x3 conv (carries the stride) -> 1x1 conv (BN, no activation), plus a
  shortcut, then ReLU. The shortcut is the identity when the stride is 1 and the widths match,
  otherwise ``avg_pool(stride, ceil_mode) -> 1x1 conv -> BN`` (OFA's ``avgpool_conv`` mode).
* global average pooling, dropout, linear classifier.

The middle width of a bottleneck follows its *output* width (OFA:
``make_divisible(round(out * expand_ratio), 8)``), not its input width as in MobileNets.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ofajax import layers
from ofajax.layers import ConvBN, ElasticConvBN


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
  """
  mid_channels: int
  out_channels: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x, train: bool, mid_active=None, out_active=None):
    shortcut = x
    if self.downsample:
      shortcut = ElasticConvBN(self.out_channels, act="identity", name="downsample")(
          avg_pool_ceil(x, self.stride), train, out_active)
    y = ElasticConvBN(self.mid_channels, 1, 1, "relu", name="conv1")(x, train, mid_active)
    y = ElasticConvBN(self.mid_channels, 3, self.stride, "relu", name="conv2")(y, train, mid_active)
    y = ElasticConvBN(self.out_channels, 1, 1, "identity", name="conv3")(y, train, out_active)
    return jax.nn.relu(y + shortcut)

  @staticmethod
  def slice_variables(variables: dict, spec: BottleneckSpec) -> dict:
    """Slices one block's {'params', 'batch_stats'} down to ``spec``'s widths."""
    p, bs = variables["params"], variables["batch_stats"]
    cin, mid, out = spec.in_channels, spec.mid_channels, spec.out_channels
    convs = [("conv1", cin, mid), ("conv2", mid, mid), ("conv3", mid, out)]
    if spec.downsample:
      convs.append(("downsample", cin, out))
    params = {n: ElasticConvBN.slice_variables(p[n], i, o) for n, i, o in convs}
    stats = {n: {"bn": {k: v[:o] for k, v in bs[n]["bn"].items()}} for n, _, o in convs}
    return {"params": params, "batch_stats": stats}


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
  """OFA-ResNet's optional stem layer: ``x + relu(bn(conv3x3(x)))`` at an elastic width."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool, active=None):
    return x + ElasticConvBN(self.features, 3, 1, "relu", name="conv")(x, train, active)


class ResidualConv(nn.Module):
  """Dense twin of :class:`ElasticResidualConv`."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    return x + ConvBN(self.features, 3, 1, "relu", name="conv")(x, train)


# --------------------------------------------------------------------------- dense network


class ResNet(nn.Module):
  """Dense ResNet-D-style classifier with static widths (what an OFA-ResNet subnet exports to)."""
  stem_mid: int
  stem_out: int
  stem_residual: bool
  blocks: tuple[BottleneckSpec, ...]
  num_classes: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = ConvBN(self.stem_mid, 3, 2, "relu", name="stem0")(x, train)
    if self.stem_residual:
      x = ResidualConv(self.stem_mid, name="stem1")(x, train)
    x = ConvBN(self.stem_out, 3, 1, "relu", name="stem2")(x, train)
    x = max_pool_3x3_s2(x)
    for spec in self.blocks:
      x = Bottleneck(spec, name=spec.name)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=layers.LINEAR_INIT, name="classifier")(x)


# --------------------------------------------------------------------------- cost


def resnet_cost(*, in_channels: int, resolution: int, stem_mid, stem_out, stem_gate,
                blocks: list[tuple[Any, Any]], num_classes: int,
                exclude_padding: bool = False) -> tuple:
  """(MACs, params) by OFA's counting convention, for static or traced widths.

  The convention is that of :func:`ofajax.models.mobilenet.mobilenet_cost` (OFA's
  ``count_net_flops``: conv and linear multiply-adds, padding taps included; pooling, BN,
  activations and additions free; params = weights, biases and BN scale / bias). It agrees with
  OFA's own analytic counter for this space, ``ResNet50LatencyTable.count_flops_given_config``.
  ``stem_gate`` is 1 when the optional stem conv runs; ``blocks`` pairs each BottleneckSpec-like
  (widths may be traced) with a gate (1 = runs, 0 = dropped by depth).
  """
  taps = layers.spatial_taps
  hw = pooled_size(resolution, 2)
  macs = taps(resolution, 3, 2, exclude_padding) * in_channels * stem_mid
  params = 9 * in_channels * stem_mid + 2 * stem_mid
  macs = macs + stem_gate * taps(hw, 3, 1, exclude_padding) * stem_mid * stem_mid
  params = params + stem_gate * (9 * stem_mid * stem_mid + 2 * stem_mid)
  macs = macs + taps(hw, 3, 1, exclude_padding) * stem_mid * stem_out
  params = params + 9 * stem_mid * stem_out + 2 * stem_out
  hw = pooled_size(hw, 2)  # max pool
  for spec, gate in blocks:
    out_hw = pooled_size(hw, spec.stride)
    cin, mid, cout = spec.in_channels, spec.mid_channels, spec.out_channels
    block_macs = (hw * hw * cin * mid + taps(hw, 3, spec.stride, exclude_padding) * mid * mid
                  + out_hw * out_hw * mid * cout)
    block_params = cin * mid + 9 * mid * mid + mid * cout + 2 * (2 * mid + cout)
    if spec.downsample:
      block_macs = block_macs + out_hw * out_hw * cin * cout
      block_params = block_params + cin * cout + 2 * cout
    macs = macs + gate * block_macs
    params = params + gate * block_params
    hw = out_hw  # blocks that depth can drop have stride 1, so gating never changes this
  features = blocks[-1][0].out_channels if blocks else stem_out
  return macs + features * num_classes, params + features * num_classes + num_classes


def dense_cost(model: ResNet, resolution: int, in_channels: int,
               exclude_padding: bool = False) -> dict:
  """Analytic cost of a dense :class:`ResNet` (Python ints)."""
  macs, params = resnet_cost(
      in_channels=in_channels, resolution=resolution, stem_mid=model.stem_mid,
      stem_out=model.stem_out, stem_gate=int(model.stem_residual),
      blocks=[(b, 1) for b in model.blocks], num_classes=model.num_classes,
      exclude_padding=exclude_padding)
  return {"macs": int(macs), "params": int(params)}
