"""The searches' moves on host archs: greedy shrink steps, OFA's mutation and crossover.

Every move ends in :meth:`SearchSpace.repair`, so its result is valid for the space (a coupled
child such as CompOFA's expand follows its depth) and canonical (equal subnets compare equal:
their names are the searches' cache keys), or None when no valid arch came out. Random archs,
host copies and the repair itself belong to the space (``space.random_host``, ``space.to_host``).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ofajax.space import SearchSpace


def arch_key(arch: dict) -> bytes:
  """A cheap cache key of a host arch: its values' bytes. Searches cost and score tens of
  thousands of archs, and ``space.name`` took a fifth of evolution's time; equal subnets share a
  key because every move ends in ``repair``, which canonicalises (a non-canonical arch only
  misses the cache, it never collides)."""
  return b"".join(np.asarray(arch[k], np.int64).tobytes() for k in sorted(arch))


def _groups(shape: tuple[int, ...], granularity: str) -> list[list[tuple[int, ...]]]:
  positions = list(np.ndindex(*shape))
  if granularity == "stage" and len(shape) >= 2:
    return [[p for p in positions if p[0] == s] for s in range(shape[0])]
  return [[p] for p in positions]


def shrink_moves(space: SearchSpace, arch: dict, granularity: str = "layer",
                 bin_steps: int = 1) -> Iterator[tuple[str, dict]]:
  """Every arch one greedy step smaller than ``arch``: ``(label, arch)``.

  A move takes one position (``granularity="layer"``: one layer's width / kernel / expand, or a
  stage's depth) or every active position of a stage (``"stage"``) down by ``bin_steps`` of its
  allowed values (AutoSlim's channel bins: steps of 8 channels in the slimmable spaces).
  """
  if granularity not in ("layer", "stage"):
    raise ValueError(f"granularity must be 'layer' or 'stage', got {granularity!r}")
  if bin_steps < 1:
    raise ValueError(f"bin_steps must be >= 1, got {bin_steps}")
  for leaf in space.leaves:
    active = space.active(arch, leaf.name)
    for group in _groups(leaf.shape, granularity):
      new = {k: v.copy() for k, v in arch.items()}
      changed = False
      for pos in group:
        if not active[pos]:
          continue
        parent = None if leaf.parent is None else int(arch[leaf.parent][pos[:-1]])
        smaller = [v for v in space.choices(leaf.name, pos, parent) if v < arch[leaf.name][pos]]
        if smaller:
          new[leaf.name][pos] = smaller[max(0, len(smaller) - bin_steps)]
          changed = True
      if changed:
        moved = space.repair(new)
        if moved is not None:
          where = ",".join(str(i) for i in group[0][:1 if len(group) > 1 else None])
          yield f"{leaf.name}[{where}]", moved


def mutate(space: SearchSpace, arch: dict, prob: float, rng: np.random.Generator) -> dict | None:
  """OFA's mutation: each position is resampled with probability ``prob``."""
  new = {}
  for leaf in space.leaves:
    value = np.array(arch[leaf.name], np.int64)
    for pos in zip(*np.nonzero(rng.random(leaf.shape) < prob)) if leaf.shape else (
        [()] if rng.random() < prob else []):
      parent = None if leaf.parent is None else int(new[leaf.parent][pos[:-1]])
      value[pos] = rng.choice(space.choices(leaf.name, pos, parent))
    new[leaf.name] = value
  return space.repair(new)


def crossover(space: SearchSpace, a: dict, b: dict, rng: np.random.Generator) -> dict | None:
  """OFA's crossover: each position comes from either parent with equal probability."""
  new = {}
  for leaf in space.leaves:
    new[leaf.name] = np.where(rng.random(leaf.shape) < 0.5, a[leaf.name], b[leaf.name])
  return space.repair(new)
