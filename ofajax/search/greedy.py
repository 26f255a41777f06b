"""Greedy slimming (AutoSlim, Yu & Huang 2019): from the largest arch, repeatedly take the one
shrink step that hurts the validation score least, until the smallest MACs target is reached.

Each round proposes every shrink move (:func:`ofajax.search.moves.shrink_moves`) that lowers
MACs, scores them all in one batched engine call and keeps the best: higher top-1, then lower
loss (which breaks the frequent top-1 ties of small validation sets), then fewer MACs. Every
round is recorded, so the path's MACs fall strictly and the arch for any target in between is
the first path entry at or below it. With upper bounds on other costs (``max_params``, a
predicted ``latency_ms``), slimming goes on until the path is within them too, and each target
gets the first path entry within its MACs and the bounds. Residual-tied layers are one width
group in the slimmable spaces, so they move together.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ofajax.search import moves


def _key(record: dict):
  return (record["top1"], -record["loss"], -record["macs"])


def greedy_search(space, evaluate: Callable, cost: Callable, targets: Sequence[float],
                  granularity: str = "layer", bin_steps: int = 1, progress=None,
                  bounds: dict | None = None, key: Callable = _key) -> dict:
  """Runs greedy slimming; returns {"path", "evaluated", "chosen"}.

  evaluate: list of archs -> list of {"top1", "loss"} (the engine); cost: arch -> {"macs",
  "params", ...}; targets: MACs budgets (any order); bounds: upper bounds on other cost keys
  (e.g. {"latency_ms": 0.5}; None values are ignored): slimming goes on until the path is
  within them too. ``chosen`` maps each target (ascending) to its first path record within the
  target and the bounds. ``key``: record -> what the best move maximises (default: top-1, then
  lower loss, then fewer MACs).
  """
  bounds = {k: v for k, v in (bounds or {}).items() if v}
  within = lambda r: all(r[k] <= v for k, v in bounds.items())
  if not targets:
    raise ValueError("greedy search needs at least one MACs target")
  smallest = cost(space.smallest())["macs"]
  if min(targets) < smallest:
    raise ValueError(f"MACs target {min(targets):,.0f} is below the smallest subnet of this "
                     f"space ({smallest:,} MACs): no arch can reach it; use targets >= {smallest:,}")
  arch = space.to_host(space.largest())
  first = dict(move="largest", round=0, arch=arch, **cost(arch), **evaluate([arch])[0])
  path, evaluated = [first], [first]
  goal = min(targets)
  while path[-1]["macs"] > goal or not within(path[-1]):
    current = path[-1]
    candidates = []
    for label, cand in moves.shrink_moves(space, current["arch"], granularity, bin_steps):
      c = cost(cand)
      if c["macs"] < current["macs"]:
        candidates.append(dict(move=label, round=len(path), arch=cand, **c))
    if not candidates and current["macs"] <= goal:  # the smallest subnet, still out of bounds
      over = {k: current[k] for k in bounds if current[k] > bounds[k]}
      raise ValueError(f"greedy slimming reached the smallest subnet and it exceeds the bounds "
                       f"{bounds}: it has {over}. Loosen the bounds.")
    if not candidates:  # cannot happen while macs > smallest; guard against a silent loop
      raise RuntimeError(f"no shrink move lowers MACs below {current['macs']:,} at round "
                         f"{len(path)}")
    for record, score in zip(candidates, evaluate([c["arch"] for c in candidates])):
      record.update(score)
    evaluated.extend(candidates)
    best = max(candidates, key=key)
    path.append(best)
    if progress is not None:
      progress.update(len(evaluated), f"scored; round {len(path) - 1}: {best['move']} -> "
                      f"{best['macs']:,} MACs, top-1 {100 * best['top1']:.2f}%")
  chosen = {}
  for t in sorted(targets):
    chosen[t] = next(r for r in path if r["macs"] <= t and within(r))
  return {"path": path, "evaluated": evaluated, "chosen": chosen}
