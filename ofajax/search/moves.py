"""Host-side arch edits shared by the searches: random archs, shrink moves, mutation, crossover.

All of them keep an arch valid for its space: a coupled child (CompOFA's expand follows depth)
is repaired after its parent changes, and gated-off positions are canonicalised so that equal
subnets compare equal (their names are the searches' cache keys).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ofajax.space import SearchSpace


def to_host(arch) -> dict:
  return {k: np.array(v, np.int64) for k, v in arch.items()}


def finish(space: SearchSpace, arch: dict) -> dict | None:
  """Repairs coupled children, canonicalises; None if the result is still invalid."""
  arch = {k: np.array(v, np.int64) for k, v in arch.items()}
  for leaf in space.leaves:
    if leaf.parent is None:
      continue
    parent = arch[leaf.parent]
    for pos in np.ndindex(*leaf.shape):
      allowed = space.choices(leaf.name, pos, int(parent[pos[:-1]]))
      if allowed and int(arch[leaf.name][pos]) not in allowed:
        below = [v for v in allowed if v <= arch[leaf.name][pos]]
        arch[leaf.name][pos] = below[-1] if below else allowed[0]
  try:
    return space.canonical_host(space.check_host(arch))
  except ValueError:
    return None


def random_arch(space: SearchSpace, rng: np.random.Generator) -> dict:
  """A uniformly random value per position, on the host (like ``space.sample``)."""
  arch = {}
  for leaf in space.leaves:
    value = np.zeros(leaf.shape, np.int64)
    for pos in np.ndindex(*leaf.shape):
      parent = None if leaf.parent is None else int(arch[leaf.parent][pos[:-1]])
      value[pos] = rng.choice(space.choices(leaf.name, pos, parent))
    arch[leaf.name] = value
  return finish(space, arch)


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
        moved = finish(space, new)
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
  return finish(space, new)


def crossover(space: SearchSpace, a: dict, b: dict, rng: np.random.Generator) -> dict | None:
  """OFA's crossover: each position comes from either parent with equal probability."""
  new = {}
  for leaf in space.leaves:
    new[leaf.name] = np.where(rng.random(leaf.shape) < 0.5, a[leaf.name], b[leaf.name])
  return finish(space, new)
