"""Mixed precision: bfloat16 compute, float32 parameters, optimizer state and BatchNorm.

The policy (``compute_dtype="bfloat16"``), applied inside the loss so that nothing outside it
changes:

- The float32 master parameters are cast to bfloat16 on the way into ``model.apply``, except
  BatchNorm's scale and bias; gradients flow back through the cast, so they, the optimizer
  state and the update stay float32.
- Every module call gets its floating inputs in bfloat16 (convolutions, depthwise taps, dense
  layers, SE run in bfloat16), except BatchNorm, which gets float32 inputs: batch mean and
  variance (E[x^2] - E[x]^2 cancels badly in 8 mantissa bits), running statistics and the
  normalisation stay float32, and its output goes back to bfloat16.
- Logits are cast to float32 before the loss and the distillation targets.

bfloat16 has float32's exponent range, so no loss scaling is needed (float16 would need it).
The model code is untouched: a Flax method interceptor does the casts at module boundaries.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"config.compute_dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def _module_paths(batch_stats) -> set[tuple[str, ...]]:
  """Paths of the modules that hold BatchNorm statistics: exactly the BatchNorm layers."""
  leaves = jax.tree_util.tree_leaves_with_path(batch_stats)
  return {tuple(k.key for k in path[:-1]) for path, _ in leaves}


def _floating(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def cast_params(params, batch_stats, dtype):
  """Floating parameters -> ``dtype``, except those of BatchNorm layers (same module path as a
  batch_stats entry), which stay as they are."""
  bn = _module_paths(batch_stats)

  def cast(path, x):
    module = tuple(k.key for k in path[:-1])
    return x if module in bn or not _floating(x) else x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


@contextlib.contextmanager
def policy(dtype, batch_stats):
  """Within this context, module calls run in ``dtype`` and BatchNorm layers in float32.

  A no-op for float32. ``batch_stats`` identifies the BatchNorm layers (by module path)."""
  if dtype == jnp.float32:
    yield
    return
  bn = _module_paths(batch_stats)

  def to(dt):
    return lambda x: x.astype(dt) if _floating(x) else x

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if tuple(context.module.path) in bn:
      args, kwargs = jax.tree.map(to(jnp.float32), (args, kwargs))
      return jax.tree.map(to(dtype), next_fun(*args, **kwargs))
    args, kwargs = jax.tree.map(to(dtype), (args, kwargs))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
