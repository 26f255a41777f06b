"""Analytic MACs and parameter counts per arch (OFA's counting convention).

``count`` works on a concrete arch (exact Python ints, computed in int64 on the host) and on a
traced one inside jit / vmap (float32, so a large net cannot overflow int32; exact up to float32
rounding, ~1e-7 relative), which makes it usable as a search constraint. The convention is
documented on :func:`ofajax.models.mobilenet.mobilenet_cost`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def count(model, arch, resolution: int, check: bool = True) -> dict:
  """``{"macs": ..., "params": ...}`` of ``arch`` of ``model`` at input ``resolution``.

  ``check=False`` skips the host validation for archs already checked (search loops).
  """
  if _is_traced(arch):
    traced = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), arch)
    macs, params = model.cost(traced, int(resolution))
    return {"macs": jnp.asarray(macs, jnp.float32), "params": jnp.asarray(params, jnp.float32)}
  if check:
    arch = model.search_space().check_host(arch)
  host = jax.tree.map(lambda v: np.asarray(v, np.int64), arch)
  macs, params = model.cost(host, int(resolution))
  return {"macs": int(macs), "params": int(params)}


def _is_traced(arch) -> bool:
  """Whether any leaf is a tracer (inside jit / vmap / grad / eval_shape). Tracers refuse to
  become numpy arrays, a public signal that needs no ``jax.core``; concrete leaves convert."""
  try:
    for leaf in jax.tree.leaves(arch):
      np.asarray(leaf)
  except jax.errors.TracerArrayConversionError:
    return True
  return False
