"""Depth gating: a block (or encoder layer) that runs only when a traced flag says so."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp


def gated(active, module: nn.Module, x, *operands, call: Callable | None = None,
          select: bool = False):
  """``call(module, x, *operands)`` where ``active`` (a traced bool) holds, ``x`` where not.

  ``call`` defaults to ``module(x, *operands)``. ``operands`` are arrays (or None): they pass
  through ``lax.cond``, which takes no Python values, so close over those (``train``) in
  ``call``. Must be called inside the parent's compact ``__call__``, where ``module`` was made.

  Normally the module runs under ``nn.cond``: a skipped block costs no compute, forward or
  backward, and its BatchNorm statistics stay untouched. The module runs unconditionally and
  the output is selected instead:

  * at initialisation, so that every block gets its variables;
  * when "bn_moments" is mutable (BN calibration sows moments from every block, and flax's
    ``cond`` needs equal variable trees in both branches; a skipped block's moments are never
    used);
  * with ``select=True``, for a caller that needs every module to run (importance measurement
    takes gradients through all layers).
  """
  call = call or (lambda mdl, x, *a: mdl(x, *a))
  if select or module.is_initializing() or module.is_mutable_collection("bn_moments"):
    return jnp.where(active, call(module, x, *operands), x)
  return nn.cond(active, call, lambda mdl, x, *a: x, module, x, *operands)
