"""The dense MobileNet that every exported CNN subnet becomes, and the shared cost formula.

``MobileNet`` is an ordinary Flax model with static shapes (stem -> inverted-residual blocks ->
1x1 head conv -> global pool -> optional feature-mix -> classifier). It covers MobileNetV2 and
MobileNetV3 subnets alike. Its parameter names are those of the supernets, so export is slicing.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ofajax import layers
from ofajax.layers import BlockSpec
from ofajax.models.base import InputSpec, check_channels


class MobileNet(nn.Module):
  """Dense MobileNetV2/V3-style classifier with static widths."""
  stem_width: int
  blocks: tuple[BlockSpec, ...]
  head_width: int
  num_classes: int
  stem_stride: int = 2
  stem_act: str = "h_swish"
  head_act: str = "h_swish"
  feature_mix_width: int = 0   # 0: no feature-mix layer (MobileNetV2)
  dropout_rate: float = 0.0
  depthwise_impl: str = "shift"
  in_channels: int = 3

  @property
  def input_spec(self) -> InputSpec:
    return InputSpec("image", channels=self.in_channels)

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_channels(x, self.in_channels)
    x = layers.ConvBN(self.stem_width, 3, self.stem_stride, self.stem_act, name="stem")(x, train)
    for spec in self.blocks:
      x = layers.MBConv(spec, self.depthwise_impl, name=spec.name)(x, train)
    x = layers.ConvBN(self.head_width, act=self.head_act, name="head")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if self.feature_mix_width:
      x = layers.h_swish(nn.Dense(self.feature_mix_width, use_bias=False, kernel_init=layers.LINEAR_INIT,
                                     name="feature_mix")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=layers.LINEAR_INIT, name="classifier")(x)


def mobilenet_cost(*, in_channels: int, resolution: int, stem_width, stem_stride: int,
                   blocks: Sequence[tuple[BlockSpec, object]], head_in, head_width,
                   feature_mix_width, num_classes: int, exclude_padding: bool = False) -> tuple:
  """(MACs, params) by OFA's counting convention, for static or traced widths.

  Convention (OFA's ``count_net_flops`` / ``count_parameters`` on the dense subnet, batch 1):
  MACs count each conv and linear layer as output elements x (k*k*in / groups) multiply-adds,
  including the taps that fall on zero padding; biases, BatchNorm, activations, pooling, SE's
  gating product and residual additions cost nothing. Params count conv / linear weights and
  biases and BN's scale and bias, not BN's running statistics nor the supernet-only kernel
  transform matrices. ``exclude_padding=True`` gives XLA's convention instead (it skips the
  taps on padding; it also counts 2 flops per MAC, plus one per elementwise op). ``blocks`` pairs each BlockSpec-like (fields may be traced ints) with a
  gate (1 = block runs, 0 = skipped by depth).
  """
  hw = layers.conv_output_size(resolution, 3, stem_stride)
  macs = layers.spatial_taps(resolution, 3, stem_stride, exclude_padding) * stem_width * in_channels
  params = 9 * in_channels * stem_width + 2 * stem_width
  for spec, gate in blocks:
    block_macs, block_params = layers.mbconv_cost(spec, hw, exclude_padding)
    macs = macs + gate * block_macs
    params = params + gate * block_params
    hw = (hw - 1) // spec.stride + 1
  macs = macs + hw * hw * head_in * head_width
  params = params + head_in * head_width + 2 * head_width
  features = head_width
  if feature_mix_width:
    macs = macs + head_width * feature_mix_width
    params = params + head_width * feature_mix_width
    features = feature_mix_width
  macs = macs + features * num_classes
  params = params + features * num_classes + num_classes
  return macs, params


def dense_cost(model: MobileNet, resolution: int, in_channels: int,
               exclude_padding: bool = False) -> dict:
  """Analytic cost of a dense :class:`MobileNet` (Python ints)."""
  head_in = model.blocks[-1].out_channels if model.blocks else model.stem_width
  macs, params = mobilenet_cost(
      in_channels=in_channels, resolution=resolution, stem_width=model.stem_width,
      stem_stride=model.stem_stride, blocks=[(b, 1) for b in model.blocks], head_in=head_in,
      head_width=model.head_width, feature_mix_width=model.feature_mix_width,
      num_classes=model.num_classes, exclude_padding=exclude_padding)
  return {"macs": int(macs), "params": int(params)}


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
