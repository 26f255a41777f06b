"""Elastic BERT (Devlin et al., 2019) for sequence classification, elastic as DynaBERT.

Structure: word + position + segment embeddings -> LayerNorm -> dropout; ``num_layers``
post-LayerNorm encoder layers (GELU FFN); a tanh pooler on the first ([CLS]) token, dropout and a
linear classifier. Inputs are int32 token ids [B, T] with ``pad_id`` marking padding, which the
attention ignores. The arch is ``{"depth", "heads", "ffn"}`` (``ofajax.models.encoder``); the
same class built with ``layers=`` is a dense subnet (:meth:`dense_model`).

The "resolution" of a text model is its sequence length: MACs are counted per example at that
length.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ofajax.layers import transformer
from ofajax.models.base import InputSpec, check_execution
from ofajax.models.encoder import ElasticEncoderMixin


class ElasticBERT(ElasticEncoderMixin, nn.Module):
  num_classes: int = 2
  vocab_size: int = 30522
  max_length: int = 512
  pad_id: int = 0
  hidden_dim: int = 768
  num_layers: int = 12
  num_heads: int = 12
  ffn_dim: int = 3072
  min_heads: int = 3
  ffn_step: int = 768
  min_ffn_dim: int = 768
  depth_choices: Sequence[int] = (6, 9, 12)
  depth_rule: str = "spread"
  pre_norm: bool = False
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  resolutions: Sequence[int] = (128,)
  execution: str = "masked"    # or "active": heads and FFN run at static width buckets
  executions: ClassVar[tuple[str, ...]] = ("masked", "active")
  width_buckets: Sequence[float] = (0.25, 0.5, 0.75, 1.0)   # active execution's, of the maximum
  layers: Sequence[transformer.LayerSpec] = ()   # non-empty: this is a dense subnet

  kernel_init = staticmethod(transformer.INIT)  # a plain attribute: not a module field

  @property
  def input_spec(self) -> InputSpec:
    return InputSpec("tokens", vocab_size=self.vocab_size)   # int32 [B, T] token ids

  def num_tokens(self, resolution: int) -> int:
    if not 1 <= resolution <= self.max_length:
      raise ValueError(f"sequence length {resolution} must be in [1, max_length="
                       f"{self.max_length}]")
    return resolution

  @nn.compact
  def __call__(self, tokens, arch=None, train: bool = False, head_scale=None,
               return_hidden: bool = False):
    check_execution(self.execution, self.executions)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"input is {tokens.dtype}{list(tokens.shape)}; this model takes int token "
                       "ids of shape [batch, length]")
    length = self.num_tokens(tokens.shape[1])
    key_mask = tokens != self.pad_id
    word = nn.Embed(self.vocab_size, self.hidden_dim, embedding_init=transformer.INIT,
                    name="word_embedding")(tokens)
    pos = self.param("pos_embedding", transformer.INIT, (self.max_length, self.hidden_dim))
    segment = self.param("segment_embedding", transformer.INIT, (2, self.hidden_dim))
    x = word + pos[:length].astype(word.dtype) + segment[0].astype(word.dtype)
    x = nn.LayerNorm(self.layer_norm_eps, name="ln_embedding")(x)
    embedding = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    h, hidden, keep = self._encode(embedding, key_mask, arch if not self.layers else None, train,
                                   head_scale, return_hidden)
    pooled = jnp.tanh(nn.Dense(self.hidden_dim, kernel_init=transformer.INIT, name="pooler")(
        h[:, 0]))
    pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    logits = nn.Dense(self.num_classes, kernel_init=transformer.INIT, name="classifier")(pooled)
    if return_hidden:
      return self._hidden_output(logits, embedding, hidden, keep, key_mask)
    return logits

  def dense_model(self, arch) -> "ElasticBERT":
    return self.clone(layers=self.dense_layers(arch), parent=None)

  def _head_cost(self, resolution: int):
    d, c = self.hidden_dim, self.num_classes
    macs = d * d + d * c   # pooler + classifier; embedding lookups are not multiply-adds
    params = ((self.vocab_size + self.max_length + 2) * d + 2 * d   # embeddings + LayerNorm
              + d * d + d + d * c + c)
    return macs, params


# Tiny variant for tests: 2 layers, 32 wide, 16-token sequences.
TINY = dict(vocab_size=64, max_length=16, hidden_dim=32, num_layers=2, num_heads=4, ffn_dim=64,
            min_heads=1, ffn_step=16, min_ffn_dim=16, depth_choices=(1, 2), dropout_rate=0.0,
            attention_dropout_rate=0.0, resolutions=(16,))
