"""Image-to-image generators and the conditional PatchGAN discriminator for GAN compression.

The models of GAN Compression (Li et al., CVPR 2020) for pix2pix, scaled to 28x28x1 images:

* `ResnetGenerator`: the CycleGAN / pix2pix ResNet generator (7x7 stem, two stride-2 downs,
  residual blocks, two stride-2 transposed-conv ups, 7x7 head, tanh). The teacher.
* `MobileResnetGenerator`: the same trunk with GAN Compression's MobileResnetBlock (each 3x3
  conv replaced by a depthwise-separable one). The student that becomes elastic.
* `PatchDiscriminator`: pix2pix's conditional PatchGAN.

The generators are plain `flax.linen` modules built only from what `ofajax.elasticize` follows
(Conv, ConvTranspose, BatchNorm, depthwise convs, residual adds, elementwise ops) with 'SAME'
padding. pix2pix pads the 7x7 convs by reflection; a pad is an op elasticize does not trace,
and zero padding costs nothing at this size.

Pruned generators. Every conv has a fixed name, and `widths` (a tuple of (name, channels)
pairs, hashable so a module stays a valid jit static argument) overrides named output widths.
`widths_from_params` reads them back from a params tree, so a pruned or exported generator is
rebuilt from its weights alone: `MobileResnetGenerator(widths=widths_from_params(params))`.
Names are module paths joined by "/" ("stem", "down2", "block0/pw1", "up1", "head").
"""

from __future__ import annotations

import os
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
from flax import serialization

# pix2pix initialises conv kernels with N(0, 0.02) (`init_weights(net, "normal", 0.02)`).
KERNEL_INIT = nn.initializers.normal(0.02)
# PyTorch BatchNorm2d's running-average momentum of 0.1, in flax's convention.
BN_MOMENTUM = 0.9
IMAGE_SHAPE = (28, 28, 1)
# ofajax.elastic.plan.NET, repeated: models must not import the elastic package (it imports them).
ELASTIC_WRAPPER = "net"


def _conv(features, kernel, name, strides=1, groups=1, use_bias=False):
  # Convs followed by BatchNorm carry no bias, as in pix2pix (the norm's shift replaces it).
  return nn.Conv(features, (kernel, kernel), (strides, strides), padding="SAME",
                 feature_group_count=groups, use_bias=use_bias, kernel_init=KERNEL_INIT,
                 name=name)


def _bn(train, name):
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, name=name)


class _Widths:
  """Resolves each conv's output width from its default and the `widths` overrides."""

  def __init__(self, overrides):
    self.overrides = {str(k): int(v) for k, v in overrides}
    self.table = {}

  def free(self, name: str, default: int) -> int:
    """A width that pruning may change (default unless overridden)."""
    width = self.overrides.get(name, default)
    if width < 1:
      raise ValueError(f"widths[{name!r}] = {width}: a conv needs at least one channel")
    self.table[name] = width
    return width

  def tied(self, name: str, value: int, why: str) -> int:
    """A width set by another layer; an override may only repeat it."""
    if self.overrides.get(name, value) != value:
      raise ValueError(f"widths[{name!r}] = {self.overrides[name]}, but {why} makes it {value}")
    self.table[name] = value
    return value

  def done(self) -> dict[str, int]:
    unknown = sorted(set(self.overrides) - set(self.table))
    if unknown:
      raise ValueError(f"widths name no conv of this generator: {unknown}; its convs: "
                       f"{sorted(self.table)}")
    return self.table


def _trunk_widths(w: _Widths, ngf: int):
  """Stem and down path widths; returns the trunk (residual) width."""
  w.free("stem", ngf)
  w.free("down1", 2 * ngf)
  return w.free("down2", 4 * ngf)


def _up_widths(w: _Widths, ngf: int, out_channels: int):
  w.free("up1", 2 * ngf)
  w.free("up2", ngf)
  w.tied("head", out_channels, "out_channels")


def _encode(x, w: dict, train: bool):
  """Stem (7x7) and two stride-2 3x3 downsamplings: 28 -> 14 -> 7."""
  x = nn.relu(_bn(train, "stem_bn")(_conv(w["stem"], 7, "stem")(x)))
  x = nn.relu(_bn(train, "down1_bn")(_conv(w["down1"], 3, "down1", strides=2)(x)))
  return nn.relu(_bn(train, "down2_bn")(_conv(w["down2"], 3, "down2", strides=2)(x)))


def _decode(x, w: dict, train: bool):
  """Two stride-2 transposed convs (7 -> 14 -> 28), the 7x7 head and tanh."""
  for name in ("up1", "up2"):
    x = nn.ConvTranspose(w[name], (3, 3), (2, 2), padding="SAME", use_bias=False,
                         kernel_init=KERNEL_INIT, name=name)(x)
    x = nn.relu(_bn(train, f"{name}_bn")(x))
  return jnp.tanh(_conv(w["head"], 7, "head", use_bias=True)(x))


class ResnetBlock(nn.Module):
  """x + BN(conv3x3(relu(BN(conv3x3(x))))); `inner` is the first conv's width."""
  dim: int
  inner: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(_bn(train, "bn1")(_conv(self.inner, 3, "conv1")(x)))
    return x + _bn(train, "bn2")(_conv(self.dim, 3, "conv2")(y))


class MobileResnetBlock(nn.Module):
  """GAN Compression's MobileResnetBlock: two depthwise-separable 3x3 convs (depthwise + BN,
  pointwise + BN), relu after the first, and the residual add. `inner` is the first pointwise
  conv's width, which the second depthwise conv keeps."""
  dim: int
  inner: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = _bn(train, "dw1_bn")(_conv(self.dim, 3, "dw1", groups=self.dim)(x))
    y = nn.relu(_bn(train, "pw1_bn")(_conv(self.inner, 1, "pw1")(y)))
    y = _bn(train, "dw2_bn")(_conv(self.inner, 3, "dw2", groups=self.inner)(y))
    return x + _bn(train, "pw2_bn")(_conv(self.dim, 1, "pw2")(y))


class _ResidualGenerator(nn.Module):
  """The encoder, `n_blocks` residual blocks at the trunk width (down2's) and the decoder; the
  subclasses choose the block and its convs' widths."""
  ngf: int = 16
  n_blocks: int = 6
  out_channels: int = 1
  widths: tuple = ()

  block: ClassVar[type]
  inner_conv: ClassVar[str]     # the block conv whose width is the block's `inner`

  def _block_widths(self, w: _Widths, i: int, dim: int) -> None:
    raise NotImplementedError

  def layer_widths(self) -> dict[str, int]:
    """Output channels of every conv, by name (defaults, then the `widths` overrides)."""
    w = _Widths(self.widths)
    dim = _trunk_widths(w, self.ngf)
    for i in range(self.n_blocks):
      self._block_widths(w, i, dim)
    _up_widths(w, self.ngf, self.out_channels)
    return w.done()

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.layer_widths()
    x = _encode(x, w, train)
    for i in range(self.n_blocks):
      x = self.block(w["down2"], w[f"block{i}/{self.inner_conv}"], name=f"block{i}")(x, train)
    return _decode(x, w, train)


class ResnetGenerator(_ResidualGenerator):
  """The CycleGAN / pix2pix ResNet generator for 28x28 images; NHWC in [-1, 1] -> tanh."""
  block: ClassVar[type] = ResnetBlock
  inner_conv: ClassVar[str] = "conv1"

  def _block_widths(self, w: _Widths, i: int, dim: int) -> None:
    w.free(f"block{i}/conv1", dim)
    w.tied(f"block{i}/conv2", dim, "the residual add onto down2")


class MobileResnetGenerator(_ResidualGenerator):
  """GAN Compression's MobileResnetGenerator for 28x28 images; NHWC in [-1, 1] -> tanh."""
  block: ClassVar[type] = MobileResnetBlock
  inner_conv: ClassVar[str] = "pw1"

  def _block_widths(self, w: _Widths, i: int, dim: int) -> None:
    w.tied(f"block{i}/dw1", dim, "its depthwise input (down2)")
    inner = w.free(f"block{i}/pw1", dim)
    w.tied(f"block{i}/dw2", inner, f"its depthwise input (block{i}/pw1)")
    w.tied(f"block{i}/pw2", dim, "the residual add onto down2")


class PatchDiscriminator(nn.Module):
  """pix2pix's conditional PatchGAN: logits [B, h, w, 1], one per overlapping patch of
  concat([condition, image]). 4x4 convs: stride 2 for the first `n_layers`, then stride 1.

  No normalisation layer: the discriminator is never made elastic, and pix2pix scores fakes and
  reals in separate calls, so BatchNorm would normalise each with the statistics of a small,
  one-sided batch; with this little network plain convs train stably."""
  ndf: int = 16
  n_layers: int = 2

  @nn.compact
  def __call__(self, condition, image):
    x = jnp.concatenate([condition, image], axis=-1)
    for i in range(self.n_layers + 1):
      strides = 2 if i < self.n_layers else 1
      x = nn.Conv(self.ndf * 2 ** i, (4, 4), (strides, strides), padding="SAME",
                  kernel_init=KERNEL_INIT, name=f"conv{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Conv(1, (4, 4), padding="SAME", kernel_init=KERNEL_INIT, name="logits")(x)


# --------------------------------------------------------------------------- rebuilding


def widths_from_params(params) -> tuple:
  """((conv name, output channels), ...) of every conv in a generator's params tree, sorted by
  name; the `widths` that rebuild the module with exactly these shapes."""
  found = []

  def walk(tree, path):
    if "kernel" in tree:
      found.append(("/".join(path), int(tree["kernel"].shape[-1])))
      return
    for key, sub in tree.items():
      if isinstance(sub, dict):
        walk(sub, path + (str(key),))

  walk(params, ())
  return tuple(sorted(found))


def _load_variables(weights: str) -> dict:
  if not os.path.isfile(weights):
    raise FileNotFoundError(f"generator weights {weights!r} do not exist (expected a flax "
                            "msgpack file of {'params', 'batch_stats'})")
  with open(weights, "rb") as f:
    variables = serialization.msgpack_restore(f.read())
  if "params" not in variables:
    raise ValueError(f"{weights!r} holds no 'params' (keys: {sorted(variables)})")
  params, stats = variables["params"], variables.get("batch_stats", {})
  # Variables saved from an elasticized supernet or its exported subnet wrap the module's own
  # under "net"; the factory returns the module's.
  if set(params) == {ELASTIC_WRAPPER}:
    params, stats = params[ELASTIC_WRAPPER], stats.get(ELASTIC_WRAPPER, {})
  return {"params": params, "batch_stats": stats}


def _factory(cls, ngf, n_blocks, out_channels, widths, weights):
  """(module, sample_input[, variables]) as `ofajax.elasticize`'s config path expects."""
  # Config JSON turns tuples into lists; the module's fields must stay hashable.
  widths = tuple((str(name), int(width)) for name, width in widths)
  sample = jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32)
  if not weights:
    return cls(ngf, n_blocks, out_channels, widths), sample
  variables = _load_variables(weights)
  widths = widths or widths_from_params(variables["params"])
  return cls(ngf, n_blocks, out_channels, widths), sample, variables


def resnet_generator(ngf=16, n_blocks=6, out_channels=1, widths=(), weights=""):
  """A `ResnetGenerator` for `config.model = "elasticize"`; with `weights` (a msgpack file of
  its variables) also its variables, and widths read from them unless given."""
  return _factory(ResnetGenerator, ngf, n_blocks, out_channels, widths, weights)


def mobile_resnet_generator(ngf=16, n_blocks=6, out_channels=1, widths=(), weights=""):
  """A `MobileResnetGenerator` for `config.model = "elasticize"`; as `resnet_generator`."""
  return _factory(MobileResnetGenerator, ngf, n_blocks, out_channels, widths, weights)
