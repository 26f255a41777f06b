"""The dense ResNet that every exported OFA-ResNet50 subnet becomes, and the shared cost formula.

Structure as OFA's reference ``ResNets`` (once-for-all, ``ofa/imagenet_classification/networks/
resnets.py``) defines it, which follows ResNet-D (He et al., "Bag of Tricks", CVPR 2019):

* stem: three 3x3 conv-BN-ReLU layers (stride 2, 1, 1); in OFA the middle one is a residual
  block (``x + relu(bn(conv(x)))``) that a subnet may skip; then a 3x3 stride-2 max pool
  (padding 1).
* bottlenecks (:mod:`ofajax.layers.resnet`).
* global average pooling, dropout, linear classifier.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ofajax import layers
from ofajax.layers import ConvBN
from ofajax.layers.resnet import (Bottleneck, BottleneckSpec, ResidualConv, max_pool_3x3_s2,
                                  pooled_size)
from ofajax.models.base import InputSpec, check_channels


# --------------------------------------------------------------------------- dense network


class ResNet(nn.Module):
  """Dense ResNet-D-style classifier with static widths (what an OFA-ResNet subnet exports to)."""
  stem_mid: int
  stem_out: int
  stem_residual: bool
  blocks: tuple[BottleneckSpec, ...]
  num_classes: int
  dropout_rate: float = 0.0
  in_channels: int = 3

  @property
  def input_spec(self) -> InputSpec:
    return InputSpec("image", channels=self.in_channels)

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_channels(x, self.in_channels)
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
