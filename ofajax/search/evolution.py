"""Evolutionary search (OFA, Cai et al. 2020, following Real et al.'s regularised evolution).

A population of archs that satisfy the constraints evolves for ``iterations`` generations: the
best ``parent_ratio`` of it survive, ``mutation_ratio`` of the next population are mutants of
random survivors (each position resampled with ``mutation_prob``), the rest are crossovers of
two random survivors; children that break a constraint are redrawn. OFA's defaults: population
100, 500 iterations, parents 0.25, mutation ratio 0.5, mutation probability 0.1.

Fitness is whatever ``fitness(archs) -> [float]`` returns: the engine's measured top-1, or an
accuracy predictor's estimate. Single-objective mode keeps the fittest under the constraints;
multi-objective mode ranks by non-dominated sorting of (fitness, MACs) with crowding distance
(NSGA-II), so the population spreads along the whole accuracy-vs-cost front.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ofajax.search import moves, pareto


@dataclasses.dataclass(frozen=True)
class Constraints:
  """Upper bounds; None = unbounded. ``latency_ms`` needs a latency predictor in ``cost``."""
  macs: float | None = None
  params: float | None = None
  latency_ms: float | None = None

  def ok(self, c: dict) -> bool:
    return all(bound is None or c[key] <= bound for key, bound in
               (("macs", self.macs), ("params", self.params), ("latency_ms", self.latency_ms)))

  def describe(self) -> str:
    parts = [f"{k} <= {v:,}" for k, v in dataclasses.asdict(self).items() if v is not None]
    return " and ".join(parts) or "unconstrained"


def check_feasible(space, cost: Callable, constraints: Constraints) -> None:
  """Raises a clear error when even the smallest arch breaks a bound."""
  c = cost(space.to_host(space.smallest()))
  for key, bound in (("macs", constraints.macs), ("params", constraints.params),
                     ("latency_ms", constraints.latency_ms)):
    if bound is not None and c[key] > bound:
      raise ValueError(f"no arch of this space satisfies {key} <= {bound:,}: the smallest "
                       f"subnet has {key} = {c[key]:,}; raise the bound to at least that")


def select(records: list[dict], k: int, multi_objective: bool = False) -> list[dict]:
  """The ``k`` best records: fittest first (ties: fewer MACs), or with ``multi_objective`` by
  NSGA-II's non-dominated rank of (fitness, MACs), then crowding distance (spread wins)."""
  if not multi_objective:
    return sorted(records, key=lambda r: (-r["fitness"], r["macs"]))[:k]
  f = [r["fitness"] for r in records]
  c = [r["macs"] for r in records]
  rank, crowd = pareto.ranks(f, c), pareto.crowding(f, c)
  order = sorted(range(len(records)), key=lambda i: (rank[i], -crowd[i], -f[i]))
  return [records[i] for i in order[:k]]


def evolve(space, fitness: Callable, cost: Callable, constraints: Constraints, *,
           population: int = 100, iterations: int = 500, parent_ratio: float = 0.25,
           mutation_ratio: float = 0.5, mutation_prob: float = 0.1, multi_objective: bool = False,
           seed: int = 0, max_tries: int = 1000, progress=None) -> dict:
  """Returns {"best", "population", "history", "seen"}: records {arch, fitness, **cost}."""
  if population < 2 or not 0 < parent_ratio < 1 or not 0 <= mutation_ratio <= 1:
    raise ValueError(f"need population >= 2, 0 < parent_ratio < 1, 0 <= mutation_ratio <= 1; "
                     f"got {population}, {parent_ratio}, {mutation_ratio}")
  check_feasible(space, cost, constraints)
  rng = np.random.default_rng(seed)
  seen: dict[str, dict] = {}   # name -> record; fitness is computed once per distinct arch

  def draw(make) -> dict:
    for _ in range(max_tries):
      arch = make()
      if arch is None:
        continue
      c = cost(arch)
      if constraints.ok(c):
        return {"arch": arch, **c}
    raise ValueError(f"no valid arch under {constraints.describe()} after {max_tries} draws; "
                     "the bounds are too tight for random sampling: loosen them")

  def score(records: list[dict]) -> None:
    new = [r for r in records if space.name(r["arch"]) not in seen]
    unique = {space.name(r["arch"]): r for r in new}
    values = fitness([r["arch"] for r in unique.values()]) if unique else []
    for (name, r), f in zip(unique.items(), values):
      seen[name] = dict(r, fitness=float(f))
    for r in records:
      r["fitness"] = seen[space.name(r["arch"])]["fitness"]

  pop = [draw(lambda: space.random_host(rng)) for _ in range(population)]
  score(pop)
  num_parents = max(1, int(round(parent_ratio * population)))
  num_mutants = int(round(mutation_ratio * population))
  history = []
  for it in range(iterations):
    parents = select(pop, num_parents, multi_objective)
    children = []
    for _ in range(num_mutants):
      p = parents[rng.integers(len(parents))]
      children.append(draw(lambda: moves.mutate(space, p["arch"], mutation_prob, rng)))
    while len(parents) + len(children) < population:
      a, b = rng.integers(len(parents), size=2)
      children.append(draw(lambda: moves.crossover(space, parents[a]["arch"],
                                                   parents[b]["arch"], rng)))
    score(children)
    pop = parents + children
    best = select(pop, 1)[0] if not multi_objective else max(pop, key=lambda r: r["fitness"])
    history.append({"iteration": it + 1, "best_fitness": best["fitness"],
                    "mean_fitness": float(np.mean([r["fitness"] for r in pop])),
                    "distinct_evaluated": len(seen)})
    if progress is not None:
      progress.update(it + 1, f"best {best['fitness']:.4f}, {len(seen)} archs scored")
  best = max(pop, key=lambda r: (r["fitness"], -r["macs"]))
  return {"best": best, "population": pop, "history": history, "seen": list(seen.values())}


def fittest_under(space, records: list[dict], targets) -> list[tuple[float, dict]]:
  """[(target, the fittest record at or under ``target`` MACs)], ties to fewer MACs: how a
  multi-objective run, constrained only by the largest target, answers every target.

  Raises a ValueError naming the target and the cheapest arch the run scored when nothing is
  under a target (the population never spread that far down the MACs axis).
  """
  chosen = []
  for t in targets:
    under = [r for r in records if r["macs"] <= t]
    if not under:
      cheapest = min(records, key=lambda r: (r["macs"], -r["fitness"]))
      raise ValueError(
          f"multi-objective evolution scored no arch at or under the MACs target {t:,.0f}: the "
          f"cheapest of its {len(records)} archs is {space.name(cheapest['arch'])} with "
          f"{cheapest['macs']:,} MACs (fitness {cheapest['fitness']:.4f}). Raise the target, "
          "or give the run more iterations or a larger population to reach further down")
    chosen.append((t, max(under, key=lambda r: (r["fitness"], -r["macs"]))))
  return chosen
