"""Losses for supernet training: label-smoothed cross-entropy and distillation (logits; and
for transformers the hidden states and embeddings, as TinyBERT and DynaBERT distil them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy to integer labels, with label smoothing (OFA: 0.1)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return _mean(optax.softmax_cross_entropy(logits, targets), weights)


def distillation(logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
                 weights: jax.Array | None = None) -> jax.Array:
  """Soft-target cross-entropy to a teacher (OFA's KD; US-Nets' in-place distillation).

  The teacher's output is detached: gradients never flow into the teacher, also when the
  teacher is the largest subnet of the same supernet. Scaled by T^2 (Hinton et al.) so the
  gradient scale does not depend on the temperature.
  """
  soft = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
  per_example = optax.softmax_cross_entropy(logits / temperature, soft)
  return _mean(per_example, weights) * temperature**2


def kl_divergence(logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
                  weights: jax.Array | None = None) -> jax.Array:
  """KL(teacher || student) of the temperature-softened outputs, times T^2.

  Equals :func:`distillation` minus the teacher's entropy: the same gradient, but zero when the
  student matches the teacher, which makes logged losses comparable across teachers.
  """
  teacher = jax.lax.stop_gradient(teacher_logits) / temperature
  log_p_teacher = jax.nn.log_softmax(teacher)
  log_p_student = jax.nn.log_softmax(logits / temperature)
  per_example = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return _mean(per_example, weights) * temperature**2


def hidden_state_mse(student: dict, teacher: dict) -> tuple[jax.Array, jax.Array]:
  """(hidden-state MSE, embedding MSE) between a subnet and its teacher.

  Both dicts come from a transformer's ``apply(..., return_hidden=True)``: "layers" [L, B, T, D]
  (each layer's output), "embedding" [B, T, D], "keep" [L] and "token_mask" [B, T]. Over the
  layers the subnet keeps, its k-th kept layer (1-based) of d*L is matched with the teacher's
  layer floor(k / d), DynaBERT's mapping (``kept_layers_index`` in its run_glue.py): a subnet
  at half depth matches teacher layers 2, 4, ..., L, and its last layer always the teacher's
  last. Padding tokens do not count. Every token's vector is standardised (a LayerNorm
  without parameters) before the squared error: a pre-LN transformer's residual stream grows
  in scale with depth and training, and unnormalised MSE on it made training diverge
  (measured on the MNIST ViT: gradient norm 1.5 -> 320 in 40 steps); post-LN BERT's hidden
  states are normalised already.
  """
  tokens = student["token_mask"].astype(jnp.float32)

  def per_token(a, b):
    a = _standardise(a.astype(jnp.float32))
    b = _standardise(jax.lax.stop_gradient(b).astype(jnp.float32))
    return jnp.mean(jnp.square(a - b), axis=-1)

  normaliser = jnp.maximum(jnp.sum(tokens), 1.0)
  matched = jnp.take(teacher["layers"], teacher_layers(student["keep"]), axis=0)
  per_layer = jnp.sum(per_token(student["layers"], matched) * tokens, axis=(1, 2))
  keep = student["keep"].astype(jnp.float32)
  hidden = jnp.sum(per_layer * keep) / (normaliser * jnp.maximum(jnp.sum(keep), 1.0))
  embedding = jnp.sum(per_token(student["embedding"], teacher["embedding"]) * tokens) / normaliser
  return hidden, embedding


def teacher_layers(keep) -> jax.Array:
  """Per layer position of the subnet, the (0-based) teacher layer its output is matched with:
  the k-th kept of D layers (1-based k) takes teacher layer floor(k * L / D) - 1, i.e. DynaBERT's
  floor(k / d) with d = D / L. Positions not kept get an index too; their terms are masked."""
  keep = jnp.asarray(keep).astype(jnp.int32)
  num_layers = keep.shape[0]
  kept = jnp.maximum(jnp.sum(keep), 1)
  return jnp.clip(jnp.cumsum(keep) * num_layers // kept - 1, 0, num_layers - 1)


def _standardise(x, eps: float = 1e-6):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + eps)


def _mean(values, weights):
  if weights is None:
    return jnp.mean(values)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
