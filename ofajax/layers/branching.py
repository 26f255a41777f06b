"""Active-size execution: run a block at one of a few static widths, chosen by traced widths.

A supernet's arch is traced data, so one compiled step serves every subnet. Masked execution
computes every layer at its maximum width. Active-size execution instead compiles a small set
of static *branches*, each computing the block at fixed widths (slicing the maximum-shape
parameters to them), and ``lax.switch``-es to the cheapest branch that holds the arch's active
widths. Where a branch is wider than the active width (a *bucket*), the remainder is masked
exactly as masked execution does, so both give the same numbers.

Under ``vmap`` over archs a switch turns into running every branch, so vmapped callers use
masked execution (see ``ofajax.evaluation``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def branch_index(actives: Sequence, branch_widths: Sequence[Sequence[int]]):
  """Index of the first branch whose widths are all >= the active ones (branches are listed
  cheapest first and the last one is the full block, so it always fits). ``None`` in
  ``actives`` adds no constraint: the caller runs that width in full in every branch (all
  ``None``: the full block, the last branch)."""
  widths = np.asarray(branch_widths)
  fits = jnp.arange(len(widths)) == len(widths) - 1
  if any(active is not None for active in actives):
    fits = jnp.ones((len(widths),), bool)
  for g, active in enumerate(actives):
    if active is not None:
      fits = fits & (jnp.asarray(widths[:, g]) >= active)
  return jnp.argmax(fits)   # the first True


def switch_widths(module: nn.Module, actives: Sequence, branch_widths: Sequence[Sequence[int]],
                  fn: Callable, *operands):
  """``fn(module, *operands, widths)`` for the cheapest branch of ``branch_widths`` that holds
  ``actives`` (see :func:`branch_index`); one compiled branch per entry.

  Each branch is rematerialised: its backward recomputes its forward, so the switch keeps only
  the branch inputs instead of every branch's activations (zero-filled when unused).
  """
  branches = [nn.remat(lambda mdl, *ops, w=tuple(w): fn(mdl, *ops, w)) for w in branch_widths]
  return nn.switch(branch_index(actives, branch_widths), branches, module, *operands)


def bucket_widths(values: Sequence[int], fractions: Sequence[float]) -> tuple[int, ...]:
  """Per fraction (ascending), the static width a bucket computes: the smallest of ``values``
  (the widths an arch may pick) at or above ``fraction * max(values)``. A last bucket of
  ``max(values)`` is added when the fractions stop short of 1, so every value fits a bucket."""
  if not fractions or not all(0 < f <= 1 for f in fractions):
    raise ValueError(f"width buckets must be fractions in (0, 1], got {tuple(fractions)}")
  maximum = max(values)
  out = [min(v for v in values if v >= f * maximum - 1e-9) for f in sorted(fractions)]
  return tuple(out) if out[-1] == maximum else (*out, maximum)


def cheapest_first(branches: Sequence[Sequence[int]], cost: Callable) -> tuple[tuple[int, ...], ...]:
  """Distinct ``branches`` sorted by ``cost(widths)``; raises unless the widest one (every width
  at its maximum) comes last, since it must hold any arch."""
  unique = sorted(set(tuple(int(v) for v in b) for b in branches), key=lambda b: (cost(b), b))
  full = tuple(max(b[g] for b in unique) for g in range(len(unique[0])))
  if unique[-1] != full:
    raise ValueError(f"the branch set must include the full widths {full} as its costliest "
                     f"branch; got {unique}")
  return tuple(unique)


def pad_channels(y, width: int):
  """``y`` zero-padded on its last axis to ``width`` channels (a no-op when already there)."""
  if y.shape[-1] == width:
    return y
  return jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, width - y.shape[-1])])
