"""What the elastic transformer supernets share: their search space, depth rule, slicing and cost.

The arch is ``{"depth": int32[], "heads": int32[L], "ffn": int32[L]}``: how many of the L layers
run (which ones: the model's ``depth_rule``), and per layer the active attention heads and FFN
hidden neurons. ``heads`` and ``ffn`` are gated by ``depth``: a dropped layer's sizes do not make
a distinct subnet. A model class mixes this in and defines the fields named below, its
embedding (``_embed``), its output head (``_head``) and ``_head_cost``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ofajax.layers import transformer
from ofajax.layers.stats import with_stats
from ofajax.space import Leaf, SearchSpace


class ElasticEncoderMixin:
  """Needs the fields ``num_layers, hidden_dim, num_heads, ffn_dim, min_heads, ffn_step,
  min_ffn_dim, depth_choices, depth_rule, resolutions, execution, width_buckets``."""

  # ------------------------------------------------------------------ sizes
  @property
  def head_dim(self) -> int:
    if self.hidden_dim % self.num_heads:
      raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of num_heads "
                       f"{self.num_heads}")
    return self.hidden_dim // self.num_heads

  def depth_values(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.depth_choices or (self.num_layers,))))

  def head_values(self) -> tuple[int, ...]:
    if not 1 <= self.min_heads <= self.num_heads:
      raise ValueError(f"min_heads must be in [1, num_heads={self.num_heads}], got {self.min_heads}")
    return tuple(range(self.min_heads, self.num_heads + 1))

  def ffn_values(self) -> tuple[int, ...]:
    return transformer.width_values(self.ffn_dim, self.ffn_step, self.min_ffn_dim)

  def depth_table(self) -> np.ndarray:
    return transformer.depth_table(self.num_layers, self.depth_values(), self.depth_rule)

  def search_space(self) -> SearchSpace:
    gate = tuple(tuple(bool(b) for b in row) for row in self.depth_table())
    n = self.num_layers
    return SearchSpace([
        Leaf("depth", (), self.depth_values()),
        Leaf("heads", (n,), self.head_values(), parent="depth", gated=True, gate=gate),
        Leaf("ffn", (n,), self.ffn_values(), parent="depth", gated=True, gate=gate),
    ], resolutions=self.resolutions)

  def keep(self, arch):
    """0/1 per layer: whether ``arch`` runs it (traced or concrete)."""
    return transformer.kept_layers(self.depth_table(), self.depth_values(), arch["depth"])

  def width_arch(self, fraction: float, depth: int | None = None) -> dict:
    """Every layer at ``fraction`` of the heads and of the FFN width (DynaBERT's width
    multiplier), rounded to the nearest allowed value; ``depth`` defaults to the largest."""
    def nearest(values, target):
      return min(values, key=lambda v: (abs(v - target), v))
    heads = nearest(self.head_values(), fraction * self.num_heads)
    ffn = nearest(self.ffn_values(), fraction * self.ffn_dim)
    n = self.num_layers
    return {"depth": np.int32(max(self.depth_values()) if depth is None else depth),
            "heads": np.full((n,), heads, np.int32), "ffn": np.full((n,), ffn, np.int32)}

  def buckets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Active-size execution's static (head counts, FFN widths): the ``width_buckets``
    fractions of the maximum, rounded up to an allowed value."""
    return (transformer.bucket_sizes(self.head_values(), self.width_buckets),
            transformer.bucket_sizes(self.ffn_values(), self.width_buckets))

  # ------------------------------------------------------------------ encoder pieces
  def _layer_kwargs(self) -> dict:
    heads, ffn = self.buckets() if self.execution == "active" else ((), ())
    return {"head_dim": self.head_dim, "pre_norm": self.pre_norm,
            "dropout_rate": self.dropout_rate,
            "attention_dropout_rate": self.attention_dropout_rate,
            "layer_norm_eps": self.layer_norm_eps, "kernel_init": self.kernel_init,
            "head_buckets": heads, "ffn_buckets": ffn}

  def _encode(self, x, key_mask, arch, train, head_scale, return_hidden):
    """The layer stack for the supernet (``arch`` given) or the dense subnet (``self.layers``)."""
    hidden = [] if return_hidden else None
    if arch is None:
      x = transformer.run_layers(x, key_mask, train, self._layer_kwargs(), num_layers=0,
                                 num_heads=0, ffn_dim=0, specs=self.layers, hidden=hidden)
      keep = None
    else:
      keep = self.keep(arch)
      x = transformer.run_layers(x, key_mask, train, self._layer_kwargs(),
                                 num_layers=self.num_layers, num_heads=self.num_heads,
                                 ffn_dim=self.ffn_dim, arch=arch, keep=keep,
                                 head_scale=head_scale, hidden=hidden)
    return x, hidden, keep

  @staticmethod
  def _hidden_output(logits, embedding, hidden, keep, key_mask):
    """``(logits, extras)`` for distillation: the embedding output, every layer's output
    [L, B, T, D], which layers ran, and which tokens are real."""
    return logits, {"embedding": embedding, "layers": jnp.stack(hidden),
                    "keep": jnp.ones((len(hidden),)) if keep is None else jnp.asarray(keep),
                    "token_mask": (jnp.ones(embedding.shape[:2], bool) if key_mask is None
                                   else key_mask)}

  # ------------------------------------------------------------------ dense subnet
  def dense_layers(self, arch) -> tuple[transformer.LayerSpec, ...]:
    return transformer.dense_specs(arch, self.depth_table(), self.depth_values())

  def slice_variables(self, variables: dict, arch) -> dict:
    """The dense subnet's variables: kept layers, cut to their active heads and neurons."""
    params = dict(variables["params"])
    for i in range(self.num_layers):
      params.pop(f"layer{i}")
    for spec in self.dense_layers(arch):
      params[spec.name] = transformer.slice_layer(variables["params"][spec.name], spec.heads,
                                                  spec.ffn)
    return with_stats(variables, params)   # no BatchNorm: empty statistics

  # ------------------------------------------------------------------ cost
  def cost(self, arch, resolution: int):
    """(MACs, params) per example of ``arch`` with inputs of size ``resolution``."""
    tokens = self.num_tokens(resolution)
    layer_macs, layer_params = transformer.encoder_cost(arch, self.keep(arch), tokens,
                                                        self.hidden_dim, self.head_dim)
    head_macs, head_params = self._head_cost(resolution)
    return layer_macs + head_macs, layer_params + head_params
