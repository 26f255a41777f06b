"""Elastic transformer encoder layers (DynaBERT, Hou et al. NeurIPS 2020; PaddleSlim's OFA).

One module serves the supernet and its dense subnets: called with ``heads`` / ``ffn`` (traced
active sizes) a layer computes at full size and zeroes the inactive heads and FFN neurons;
built with smaller ``num_heads`` / ``ffn_dim`` and called without them it *is* the dense
subnet, with the same parameter names, so export is slicing (:func:`slice_layer`).

Active-size execution (``head_buckets`` / ``ffn_buckets`` of :class:`EncoderLayer`) runs each
attention and FFN at the smallest of a few static widths ("buckets") that holds the traced active
size, slicing the parameters to it and masking the remainder: the same numbers as masking, at
about the cost of the bucket. The hidden size is fixed, so the switches take and return
full-width tensors.

Widths are prefixes: the first ``heads`` heads and the first ``ffn`` neurons are active. Re-ordering
by importance (``ofajax.importance``) permutes the parameters so that those prefixes hold the
most important heads and neurons (:func:`permute_layer`).

Depth is a per-layer keep flag. :func:`depth_table` turns a depth into the layers kept, by one of
two rules: ``"first"`` keeps the first k layers (OFA); ``"spread"`` drops layers evenly over the
stack, as DynaBERT does (depth multiplier 0.5 of 12 layers drops layers 1, 3, ..., 11).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofajax.layers.branching import bucket_widths, switch_widths
from ofajax.layers.common import channel_mask
from ofajax.layers.gating import gated

DEPTH_RULES = ("first", "spread")
# BERT's initializer: truncated normal with std 0.02 for every weight matrix and embedding. It
# suits BERT's 768 widths; a 64-wide ViT learns MNIST ~2.5x slower with it than with Xavier
# (measured: cross-entropy 1.72 vs 0.69 after 150 Adam steps), so ViTs use Xavier-uniform
# (as ViT's reference implementation does).
INIT = nn.initializers.truncated_normal(0.02)
VIT_INIT = nn.initializers.xavier_uniform()
# Masked attention logits: a large finite negative (not -inf), so an all-padding row stays finite.
NEG_INF = -1e9


def depth_table(num_layers: int, depths: Sequence[int], rule: str) -> np.ndarray:
  """bool [len(depths), num_layers]: row j says which layers a depth of ``depths[j]`` keeps."""
  if rule not in DEPTH_RULES:
    raise ValueError(f"depth rule must be one of {DEPTH_RULES}, got {rule!r}")
  table = np.zeros((len(depths), num_layers), bool)
  for j, k in enumerate(depths):
    if not 1 <= k <= num_layers:
      raise ValueError(f"depth {k} must be in [1, {num_layers}]")
    if rule == "first":
      table[j, :k] = True
    else:
      table[j] = True
      drop = num_layers - k
      # The i-th of the dropped layers (i = 1..drop) is layer floor(i * L / drop) - 1.
      for i in range(1, drop + 1):
        table[j, (i * num_layers) // drop - 1] = False
  return table


def kept_layers(table: np.ndarray, depths: Sequence[int], depth) -> jax.Array | np.ndarray:
  """The [num_layers] keep flags of ``depth`` (traced int / float or concrete), as 0/1."""
  xp = jnp if isinstance(depth, jax.Array) else np
  onehot = xp.asarray(depth)[..., None] == xp.asarray(depths)
  return (onehot[..., None] * xp.asarray(table, xp.float32)).sum(-2)


def sincos_2d(side: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embeddings [side * side, dim] of a side x side patch grid
  (row-major), as the "simple ViT" of Beyer et al. (2022) uses: a quarter of the channels each
  for sin / cos of the row and of the column, at geometric frequencies."""
  if dim % 4:
    raise ValueError(f"sine-cosine positions need a hidden size divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  freq = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 or 1))
  r, c = rows.reshape(-1, 1) * freq, cols.reshape(-1, 1) * freq
  return np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1).astype(np.float32)


class Attention(nn.Module):
  """Multi-head self-attention with ``heads`` of ``num_heads`` active (a prefix).

  Kernels are [hidden, heads, head_dim] (query / key / value) and [heads, head_dim, hidden]
  (out), so a head is one slice of the heads axis. ``head_scale`` [num_heads] multiplies each
  head's context (1 = unchanged); its gradient is the head importance of Michel et al. (2019)
  that DynaBERT uses.

  With ``buckets`` (static head counts, ascending, the last ``num_heads``) and a traced
  ``heads``, it runs at the smallest bucket holding ``heads``, masking the rest of the bucket
  (active-size execution, :mod:`ofajax.layers.branching`).
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  kernel_init: Any = INIT
  buckets: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, key_mask, train: bool, heads=None, head_scale=None):
    if heads is not None and len(self.buckets) > 1 and not self.is_initializing():
      # The dropout mask is drawn here, at full size, because a module inside the switch gets
      # a different random stream: the branches slice it, dropping what masked execution drops.
      keep = None
      if train and self.dropout_rate > 0:
        shape = (x.shape[0], self.num_heads, x.shape[1], x.shape[1])
        keep = nn.Dropout(self.dropout_rate, deterministic=False)(jnp.ones(shape, x.dtype))
      return switch_widths(self, (heads,), [(b,) for b in self.buckets],
                           lambda mdl, x, m, h, s, d, w: mdl.attend(x, m, train, h, s, w[0], d),
                           x, key_mask, heads, head_scale, keep)
    return self.attend(x, key_mask, train, heads, head_scale)

  def attend(self, x, key_mask, train: bool, heads, head_scale, width=None, keep=None):
    """Attention over all heads (``width`` None: the parameters' own modules and dropout) or over
    the first ``width`` (sliced parameters, dropout by the full-size ``keep`` mask, or none);
    ``heads`` masks within them."""
    size = width or self.num_heads
    q, k, v = (self._project(name, x, width) for name in ("query", "key", "value"))
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(self.head_dim)
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    if width is None:
      probs = nn.Dropout(self.dropout_rate, deterministic=not train)(probs)
    elif keep is not None:
      probs = probs * keep[:, :width]
    context = jnp.einsum("bhqt,bthk->bqhk", probs, v)
    gate = channel_mask(heads, size, context.dtype) if heads is not None else None
    if head_scale is not None:
      gate = head_scale[:size] if gate is None else gate * head_scale[:size]
    if gate is not None:
      context = context * gate[:, None]
    if width is None:
      return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), kernel_init=self.kernel_init,
                             name="out")(context)
    out = self.variables["params"]["out"]
    return jnp.einsum("bthk,hkd->btd", context, out["kernel"][:width]) + out["bias"]

  def _project(self, name: str, x, width):
    """Query / key / value [B, T, heads, head_dim]: all heads, or the first ``width``."""
    if width is None:
      return nn.DenseGeneral((self.num_heads, self.head_dim), kernel_init=self.kernel_init,
                             name=name)(x)
    # A bucket reads the module's full-shape parameters and slices them (calling the module
    # would make parameters of the bucket's shape); masked execution calls the modules as before.
    p = self.variables["params"][name]
    return jnp.einsum("btd,dhk->bthk", x, p["kernel"][:, :width]) + p["bias"][:width]


class FeedForward(nn.Module):
  """Dense -> GELU -> Dense with ``ffn`` of ``ffn_dim`` hidden neurons active (a prefix).

  With ``buckets`` (static widths, ascending, the last ``ffn_dim``) and a traced ``ffn``, it
  runs at the smallest bucket holding ``ffn``, as :class:`Attention` does with heads."""
  ffn_dim: int
  kernel_init: Any = INIT
  buckets: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, ffn=None):
    if ffn is not None and len(self.buckets) > 1 and not self.is_initializing():
      return switch_widths(self, (ffn,), [(b,) for b in self.buckets],
                           lambda mdl, x, f, w: mdl.feed_forward(x, f, w[0]), x, ffn)
    return self.feed_forward(x, ffn)

  def feed_forward(self, x, ffn, width=None):
    """All ``ffn_dim`` neurons (``width`` None) or the first ``width``; ``ffn`` masks within."""
    if width is None:
      h = nn.Dense(self.ffn_dim, kernel_init=self.kernel_init, name="fc1")(x)
    else:
      fc1 = self.variables["params"]["fc1"]
      h = x @ fc1["kernel"][:, :width] + fc1["bias"][:width]
    h = jax.nn.gelu(h, approximate=False)
    if ffn is not None:  # after the activation: gelu(bias) of an inactive neuron is not zero
      h = h * channel_mask(ffn, width or self.ffn_dim, h.dtype)
    if width is None:
      return nn.Dense(x.shape[-1], kernel_init=self.kernel_init, name="fc2")(h)
    fc2 = self.variables["params"]["fc2"]
    return h @ fc2["kernel"][:width] + fc2["bias"]


def bucket_sizes(values: Sequence[int], fractions: Sequence[float]) -> tuple[int, ...]:
  """The distinct static widths (ascending) of width ``fractions``: per fraction the smallest of
  ``values`` (the widths an arch may pick) at or above ``fraction * max(values)``, plus the
  maximum, so every value fits a bucket."""
  return tuple(sorted(set(bucket_widths(values, fractions))))


class EncoderLayer(nn.Module):
  """Attention + FFN with residuals; ``pre_norm`` (ViT) or post-norm (BERT) LayerNorms."""
  num_heads: int
  head_dim: int
  ffn_dim: int
  pre_norm: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  kernel_init: Any = INIT
  head_buckets: Sequence[int] = ()   # active-size execution: static head counts
  ffn_buckets: Sequence[int] = ()    # ... and FFN widths (empty: masked execution)

  @nn.compact
  def __call__(self, x, key_mask, train: bool = False, heads=None, ffn=None, head_scale=None):
    attention = Attention(self.num_heads, self.head_dim, self.attention_dropout_rate,
                          self.kernel_init, self.head_buckets, name="attention")
    feed_forward = FeedForward(self.ffn_dim, self.kernel_init, self.ffn_buckets, name="ffn")
    norm1 = nn.LayerNorm(self.layer_norm_eps, name="ln_attention")
    norm2 = nn.LayerNorm(self.layer_norm_eps, name="ln_ffn")
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    if self.pre_norm:
      x = x + drop(attention(norm1(x), key_mask, train, heads, head_scale))
      return x + drop(feed_forward(norm2(x), ffn))
    x = norm1(x + drop(attention(x, key_mask, train, heads, head_scale)))
    return norm2(x + drop(feed_forward(x, ffn)))


class LayerSpec(NamedTuple):
  """A dense subnet's layer: its supernet name, active heads and FFN width."""
  name: str
  heads: int
  ffn: int


def run_layers(x, key_mask, train: bool, layer_kwargs: dict, *, num_layers: int,
               num_heads: int, ffn_dim: int, arch=None, keep=None, head_scale=None,
               specs: Sequence[LayerSpec] = (), hidden: list | None = None):
  """The encoder stack of a supernet (``arch`` given) or of a dense subnet (``specs``).

  Must be called inside a module's compact ``__call__`` (the layers become its children).
  Supernet layers are ``layer{i}``; a layer that ``keep`` drops is skipped with
  :func:`ofajax.layers.gating.gated` (no compute, forward or backward); importance measurement
  (``head_scale``) runs every layer and selects, so that every layer's heads get a gradient.
  ``hidden`` collects each layer's output (a dropped layer passes its input on).
  """
  kwargs = {k: v for k, v in layer_kwargs.items() if k != "head_dim"}
  head_dim = layer_kwargs["head_dim"]
  if arch is None:
    for spec in specs:
      x = EncoderLayer(spec.heads, head_dim, spec.ffn, **kwargs, name=spec.name)(x, key_mask,
                                                                                  train)
      if hidden is not None:
        hidden.append(x)
    return x
  for i in range(num_layers):
    layer = EncoderLayer(num_heads, head_dim, ffn_dim, **kwargs, name=f"layer{i}")
    scale = None if head_scale is None else head_scale[i]
    x = gated(keep[i] > 0, layer, x, arch["heads"][i], arch["ffn"][i], scale,
              call=lambda mdl, x, h, f, s: mdl(x, key_mask, train, h, f, s),
              select=scale is not None)
    if hidden is not None:
      hidden.append(x)
  return x


# ----------------------------------------------------------------------------- slicing


def slice_layer(params: dict, heads: int, ffn: int) -> dict:
  """One supernet layer's params cut to ``heads`` heads and ``ffn`` FFN neurons."""
  att, mlp = params["attention"], params["ffn"]
  qkv = {n: {"kernel": att[n]["kernel"][:, :heads], "bias": att[n]["bias"][:heads]}
         for n in ("query", "key", "value")}
  return {**params,
          "attention": {**qkv, "out": {"kernel": att["out"]["kernel"][:heads],
                                       "bias": att["out"]["bias"]}},
          "ffn": {"fc1": {"kernel": mlp["fc1"]["kernel"][:, :ffn], "bias": mlp["fc1"]["bias"][:ffn]},
                  "fc2": {"kernel": mlp["fc2"]["kernel"][:ffn], "bias": mlp["fc2"]["bias"]}}}


def permute_layer(params: dict, head_order, neuron_order) -> dict:
  """One layer's params with heads and FFN neurons re-ordered (``order[j]``: the old index that
  goes to position j). The layer computes exactly the same function."""
  att, mlp = params["attention"], params["ffn"]
  h, n = jnp.asarray(head_order), jnp.asarray(neuron_order)
  qkv = {name: {"kernel": att[name]["kernel"][:, h], "bias": att[name]["bias"][h]}
         for name in ("query", "key", "value")}
  return {**params,
          "attention": {**qkv, "out": {"kernel": att["out"]["kernel"][h],
                                       "bias": att["out"]["bias"]}},
          "ffn": {"fc1": {"kernel": mlp["fc1"]["kernel"][:, n], "bias": mlp["fc1"]["bias"][n]},
                  "fc2": {"kernel": mlp["fc2"]["kernel"][n], "bias": mlp["fc2"]["bias"]}}}


# ----------------------------------------------------------------------------- cost


def layer_cost(tokens, hidden: int, heads, head_dim: int, ffn) -> tuple[Any, Any]:
  """(MACs, params) of one encoder layer on ``tokens`` tokens; sizes may be traced.

  MACs count the multiply-adds of the matrix products (projections, attention scores,
  attention-weighted values, FFN), as OFA counts only conv / linear layers; softmax, GELU and
  LayerNorm are not counted. Params include biases and both LayerNorms.
  """
  inner = heads * head_dim
  macs = (tokens * hidden * inner * 4        # query, key, value, out projections
          + 2 * tokens * tokens * inner      # q.k scores and probs.v
          + 2 * tokens * hidden * ffn)       # fc1, fc2
  params = (4 * hidden * inner + 3 * inner + hidden    # projections + biases
            + 2 * hidden * ffn + ffn + hidden          # fc1, fc2 + biases
            + 4 * hidden)                              # two LayerNorms
  return macs, params


def encoder_cost(arch, keep, tokens, hidden: int, head_dim: int):
  """Summed (MACs, params) of the kept layers of a supernet arch (``keep``: 0/1 per layer)."""
  macs, params = 0, 0
  for i in range(len(keep)):
    m, p = layer_cost(tokens, hidden, arch["heads"][i], head_dim, arch["ffn"][i])
    macs, params = macs + keep[i] * m, params + keep[i] * p
  return macs, params


def dense_specs(arch, table: np.ndarray, depths: Sequence[int]) -> tuple[LayerSpec, ...]:
  """The dense subnet's layers of a concrete arch: kept layers with their active sizes."""
  keep = kept_layers(table, depths, np.asarray(arch["depth"]))
  heads, ffn = np.asarray(arch["heads"]), np.asarray(arch["ffn"])
  return tuple(LayerSpec(f"layer{i}", int(heads[i]), int(ffn[i]))
               for i in range(len(keep)) if keep[i])


def width_values(maximum: int, step: int, minimum: int) -> tuple[int, ...]:
  """Multiples of ``step`` from ``minimum`` (rounded up to one) to ``maximum``."""
  if step < 1 or maximum % step:
    raise ValueError(f"width step {step} must divide the maximum {maximum}")
  low = max(step, -(-minimum // step) * step)
  return tuple(range(low, maximum + 1, step))


__all__ = ["sincos_2d", "Attention", "FeedForward", "bucket_sizes", "EncoderLayer", "LayerSpec", "DEPTH_RULES", "depth_table",
           "kept_layers", "run_layers", "slice_layer", "permute_layer", "layer_cost",
           "encoder_cost", "dense_specs", "width_values"]
