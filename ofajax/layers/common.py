"""What every elastic layer shares: channel rounding, prefix masks, branch-free lookups,
activations and OFA's initialisers."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def make_divisible(v, divisor: int = 8, min_value: int | None = None):
  """OFA's / MobileNet's channel rounding, for Python ints and for (traced) integer arrays."""
  min_value = divisor if min_value is None else min_value
  if isinstance(v, (int, float, np.integer, np.floating)):
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v
  # Integer arrays: int(v + d/2) == v + d//2 for integer v and even d.
  xp = jnp if isinstance(v, jax.Array) else np
  new_v = xp.maximum(min_value, (v + divisor // 2) // divisor * divisor)
  return xp.where(new_v * 10 < 9 * v, new_v + divisor, new_v)


def channel_mask(active, size: int, dtype=jnp.float32) -> jax.Array:
  """A [size] prefix mask with ``active`` ones; ``active=None`` means all."""
  if active is None:
    return jnp.ones((size,), dtype)
  return (jnp.arange(size) < active).astype(dtype)


def lookup(value, keys: Sequence[int], outs: Sequence[int]):
  """Maps a (traced or concrete) int ``value`` in ``keys`` to ``outs`` without Python branching."""
  xp = jnp if isinstance(value, jax.Array) else np
  keys_arr, outs_arr = xp.asarray(keys), xp.asarray(outs)
  return (xp.where(xp.asarray(value)[..., None] == keys_arr, outs_arr, 0)).sum(-1)


def h_sigmoid(x):
  return jax.nn.relu6(x + 3.0) / 6.0


def h_swish(x):
  return x * h_sigmoid(x)


ACTIVATIONS = {"relu": jax.nn.relu, "relu6": jax.nn.relu6, "h_swish": h_swish,
               "identity": lambda x: x}


# OFA's initialisation ("he_fout"): convs (SE's 1x1 convs too) N(0, 2 / (k*k*out)), biases zero;
# linear layers U(-1/sqrt(in), 1/sqrt(in)). Untruncated normals also compile faster than
# truncated ones, which matters with ~100 parameters per supernet.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
