"""Elastic ViT (Dosovitskiy et al., ICLR 2021) with DynaBERT-style elastic heads, FFN and depth.

Structure: non-overlapping ``patch_size`` patches -> linear patch embedding, a learned class
token and learned position embeddings; ``num_layers`` pre-LayerNorm encoder layers (GELU FFN);
a final LayerNorm on the class token and a linear classifier. ``pool="mean"`` with
``position="sincos"`` is instead the "simple ViT" of Beyer et al. (2022): no class token, fixed 2-D
sine-cosine positions, global average pooling; on small data sets it learns much faster. The arch is
``{"depth", "heads", "ffn"}`` (``ofajax.models.encoder``); ``apply(variables, x, arch,
train=...)`` runs the supernet on NHWC images, and the same class built with ``layers=`` is a
dense subnet (``apply(variables, x, train=...)``), which :meth:`dense_model` makes.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ofajax.layers import transformer
from ofajax.models.base import InputSpec, check_execution
from ofajax.models.encoder import ElasticEncoderMixin


class ElasticViT(ElasticEncoderMixin, nn.Module):
  num_classes: int = 1000
  in_channels: int = 3
  patch_size: int = 16
  hidden_dim: int = 192
  num_layers: int = 12
  num_heads: int = 3
  ffn_dim: int = 768
  min_heads: int = 1
  ffn_step: int = 192
  min_ffn_dim: int = 192
  depth_choices: Sequence[int] = (6, 9, 12)
  depth_rule: str = "first"
  pre_norm: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  pool: str = "cls"             # "cls" (class token) or "mean" (average of the patch tokens)
  position: str = "learned"     # "learned" or "sincos" (fixed, no parameters)
  resolutions: Sequence[int] = (224,)
  execution: str = "masked"    # or "active": heads and FFN run at static width buckets
  executions: ClassVar[tuple[str, ...]] = ("masked", "active")
  width_buckets: Sequence[float] = (0.25, 0.5, 0.75, 1.0)   # active execution's, of the maximum
  layers: Sequence[transformer.LayerSpec] = ()   # non-empty: this is a dense subnet

  kernel_init = staticmethod(transformer.VIT_INIT)  # a plain attribute: not a module field

  @property
  def input_spec(self) -> InputSpec:
    return InputSpec("image", channels=self.in_channels)

  def num_tokens(self, resolution: int) -> int:
    if resolution % self.patch_size:
      raise ValueError(f"resolution {resolution} must be a multiple of patch_size "
                       f"{self.patch_size}")
    return (resolution // self.patch_size) ** 2 + (self.pool == "cls")

  @nn.compact
  def __call__(self, x, arch=None, train: bool = False, head_scale=None,
               return_hidden: bool = False):
    check_execution(self.execution, self.executions)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"input has shape {x.shape}; this model takes NHWC images with "
                       f"in_channels={self.in_channels}")
    if x.shape[1] != x.shape[2] or x.shape[1] not in self.resolutions:
      raise ValueError(f"input images are {x.shape[1]}x{x.shape[2]}; the position embeddings "
                       f"are learned for square images of resolutions {tuple(self.resolutions)}")
    b, size, p = x.shape[0], x.shape[1], self.patch_size
    n = size // p
    patches = x.reshape(b, n, p, n, p, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
    tokens = nn.Dense(self.hidden_dim, kernel_init=transformer.VIT_INIT, name="patch_embed")(
        patches.reshape(b, n * n, p * p * x.shape[-1]))
    if self.pool not in ("cls", "mean") or self.position not in ("learned", "sincos"):
      raise ValueError(f"pool must be 'cls' or 'mean' and position 'learned' or 'sincos', got "
                       f"{self.pool!r} / {self.position!r}")
    if self.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden_dim))
      tokens = jnp.concatenate(
          [jnp.broadcast_to(cls, (b, 1, self.hidden_dim)).astype(tokens.dtype), tokens], axis=1)
    if self.position == "learned":
      pos = self.param("pos_embedding", transformer.INIT, (1, tokens.shape[1], self.hidden_dim))
    else:
      pos = transformer.sincos_2d(n, self.hidden_dim)
      if self.pool == "cls":  # the class token has no position
        pos = jnp.concatenate([jnp.zeros((1, self.hidden_dim)), pos])
    embedding = nn.Dropout(self.dropout_rate, deterministic=not train)(
        tokens + pos.astype(tokens.dtype))
    h, hidden, keep = self._encode(embedding, None, arch if not self.layers else None, train,
                                   head_scale, return_hidden)
    h = h[:, 0] if self.pool == "cls" else jnp.mean(h, axis=1)
    h = nn.LayerNorm(self.layer_norm_eps, name="ln_final")(h)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="classifier")(h)
    if return_hidden:
      return self._hidden_output(logits, embedding, hidden, keep, None)
    return logits

  def dense_model(self, arch) -> "ElasticViT":
    return self.clone(layers=self.dense_layers(arch), parent=None)

  def _head_cost(self, resolution: int):
    d, c = self.hidden_dim, self.num_classes
    n = (resolution // self.patch_size) ** 2
    patch = self.patch_size ** 2 * self.in_channels
    macs = n * patch * d + d * c
    cls = d if self.pool == "cls" else 0
    pos = self.num_tokens(resolution) * d if self.position == "learned" else 0
    params = patch * d + d + cls + pos + 2 * d + d * c + c
    return macs, params


# Tiny variant for tests: 4x4 patches of 7 pixels on 28x28 images, 3 thin layers.
TINY = dict(in_channels=1, patch_size=7, hidden_dim=32, num_layers=3, num_heads=4, ffn_dim=64,
            ffn_step=16, min_ffn_dim=16, depth_choices=(1, 2, 3), resolutions=(28,))
# The MNIST demo (configs/elastic_vit_mnist.py): 7x7 patches of 28x28 images, 16 + 1 tokens
# (4x4 patches, 49 + 1 tokens, trained 3x slower than the 10-minute CPU budget allows).
MNIST = dict(in_channels=1, patch_size=7, hidden_dim=64, num_layers=6, num_heads=4, ffn_dim=256,
             ffn_step=64, min_ffn_dim=64, depth_choices=(3, 4, 5, 6), resolutions=(28,))
