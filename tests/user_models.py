"""Plain Flax models as a user would write them, nothing tuned for ofajax: what
``ofajax.elasticize`` must convert. Tiny widths so tests stay fast; the layouts follow common
examples (the ResNet block is written as in flax's ImageNet example)."""

from __future__ import annotations

import functools
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


class ResNetBlock(nn.Module):
  filters: int
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    residual = x
    y = conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(norm()(y))
    y = conv(self.filters, (3, 3))(y)
    y = norm(scale_init=nn.initializers.ones)(y)
    if residual.shape != y.shape:
      residual = conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet18(nn.Module):
  """ResNet-18's layout (two blocks per stage, projection shortcuts) at tiny widths."""
  stage_sizes: Sequence[int] = (2, 2, 2)
  width: int = 8
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.width, (5, 5), (1, 1), use_bias=False, name="conv_init")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn_init")(x))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.width * 2 ** i, strides, name=f"stage{i}_block{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class InvertedResidual(nn.Module):
  in_features: int
  out_features: int
  expand: int
  strides: int = 1
  kernel: int = 3

  @nn.compact
  def __call__(self, x, train: bool = True):
    hidden = self.in_features * self.expand
    y = nn.relu6(nn.BatchNorm(not train)(nn.Conv(hidden, (1, 1), use_bias=False)(x)))
    y = nn.Conv(hidden, (self.kernel,) * 2, self.strides, feature_group_count=hidden,
                use_bias=False)(y)
    y = nn.relu6(nn.BatchNorm(not train)(y))
    y = nn.BatchNorm(not train)(nn.Conv(self.out_features, (1, 1), use_bias=False)(y))
    if self.strides == 1 and self.in_features == self.out_features:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  # (expand, channels, blocks, stride, depthwise kernel)
  settings: Sequence[tuple[int, ...]] = ((1, 8, 1, 1, 3), (4, 12, 2, 2, 3), (4, 16, 2, 2, 5))
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu6(nn.BatchNorm(not train)(nn.Conv(8, (3, 3), use_bias=False)(x)))
    cin = 8
    for t, c, n, s, k in self.settings:
      for i in range(n):
        x = InvertedResidual(cin, c, t, s if i == 0 else 1, k)(x, train)
        cin = c
    x = nn.relu6(nn.BatchNorm(not train)(nn.Conv(32, (1, 1), use_bias=False)(x)))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class VGG(nn.Module):
  """Conv stacks and max pooling, then a flatten into dense layers; no residuals."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, training: bool = False):
    for width in (8, 16):
      for _ in range(2):
        x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(0.1, deterministic=not training)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
  features: Sequence[int] = (48, 32)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for f in self.features:
      x = nn.gelu(nn.Dense(f)(x))
    return nn.Dense(self.num_classes)(x)


class UNet(nn.Module):
  """Two levels, a transposed-conv upsampling and a concatenation skip; per-pixel logits."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda: nn.BatchNorm(use_running_average=not train)
    e1 = nn.relu(bn()(nn.Conv(8, (3, 3))(x)))
    e2 = nn.relu(bn()(nn.Conv(16, (3, 3))(nn.max_pool(e1, (2, 2), (2, 2)))))
    up = nn.ConvTranspose(8, (2, 2), (2, 2))(e2)
    d1 = nn.relu(bn()(nn.Conv(8, (3, 3))(jnp.concatenate([up, e1], axis=-1))))
    return nn.Conv(self.num_classes, (1, 1))(d1)


# name -> (module, input shape, skippable blocks)
MODELS = {
    "resnet18": (ResNet18(), (2, 16, 16, 3), ("stage0_block1", "stage1_block1", "stage2_block1")),
    "mobilenet_v2": (MobileNetV2(), (2, 16, 16, 3), ("InvertedResidual_2", "InvertedResidual_4")),
    "vgg": (VGG(), (2, 16, 16, 1), ()),
    "mlp": (MLP(), (2, 8, 8, 1), ()),
    "unet": (UNet(), (2, 16, 16, 1), ()),
}


class DigitsCNN(nn.Module):
  """The end-to-end test's plain CNN for 8x8 digits (``widths``: a pruned one's are smaller)."""
  widths: tuple[int, int, int] = (16, 32, 32)

  @nn.compact
  def __call__(self, x, train: bool = False):
    a, b, c = self.widths
    x = nn.relu(nn.BatchNorm(not train)(nn.Conv(a, (3, 3), use_bias=False)(x)))
    x = nn.relu(nn.BatchNorm(not train)(nn.Conv(b, (3, 3), (2, 2), use_bias=False)(x)))
    x = nn.relu(nn.Dense(c)(jnp.mean(x, axis=(1, 2))))
    return nn.Dense(10)(x)


def digits_cnn(weights: str = ""):
  """A factory as ``config.model_options.factory`` names it: (module, sample input, trained
  variables read from ``weights``, a flax msgpack file, when given). The module is built at the
  weights' widths, so a pruned DigitsCNN (``ofajax.prune``) loads too."""
  sample = jnp.zeros((1, 8, 8, 1))
  if not weights:
    return DigitsCNN(), sample
  with open(weights, "rb") as f:
    variables = flax.serialization.msgpack_restore(f.read())
  params = variables["params"]
  widths = tuple(int(params[n]["kernel"].shape[-1]) for n in ("Conv_0", "Conv_1", "Dense_0"))
  module = DigitsCNN(widths)
  template = module.init(jax.random.key(0), sample)
  return module, sample, flax.serialization.from_state_dict(template, variables)
