"""Losses for supernet training: label-smoothed cross-entropy and distillation."""

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


def _mean(values, weights):
  if weights is None:
    return jnp.mean(values)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
