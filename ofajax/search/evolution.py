"""Evolutionary search (OFA, Cai et al. 2020, following Real et al.'s regularised evolution).

A population of candidates that satisfy the constraints evolves for ``iterations`` generations,
as OFA's ``ofa/nas/search_algorithm/evolution.py`` does: the best ``parent_ratio`` of it survive,
``mutation_ratio * population`` mutants of random survivors (each position resampled with
``mutation_prob``) and ``population`` minus that many crossovers of two random survivors join
them; children that break a constraint are redrawn. OFA's defaults: population 100, 500
iterations, parent ratio 0.25, mutation ratio 0.5 (25 parents, 50 mutants, 50 crossovers per
generation), mutation probability 0.1.

A candidate is an arch and an input resolution: with several resolutions (a supernet trained at
several, as OFA's 128..224) the resolution is one more gene, and cost and fitness are taken at
it. With one resolution nothing about it changes.

Fitness is whatever ``fitness(archs, resolutions) -> [float]`` returns: the engine's measured
top-1, or an accuracy predictor's estimate. Single-objective mode keeps the fittest under the
constraints; multi-objective mode ranks by non-dominated sorting of (fitness, MACs) with
crowding distance (NSGA-II), so the population spreads along the whole accuracy-vs-cost front.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

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


def _lowest(resolutions: Sequence) -> object:
  """The smallest resolution offered (None when resolution is no gene): the cheapest input."""
  return min((r for r in resolutions if r is not None), default=None)


def check_feasible(space, cost: Callable, constraints: Constraints,
                   resolutions: Sequence = (None,)) -> None:
  """Raises a clear error when even the smallest arch at the lowest resolution breaks a bound."""
  low = _lowest(resolutions)
  c = cost(space.to_host(space.smallest()), low)
  at = "" if low is None else f" at resolution {low}"
  for key, bound in (("macs", constraints.macs), ("params", constraints.params),
                     ("latency_ms", constraints.latency_ms)):
    if bound is not None and c[key] > bound:
      raise ValueError(f"no arch of this space satisfies {key} <= {bound:,}: the smallest "
                       f"subnet{at} has {key} = {c[key]:,}; raise the bound to at least that")


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


def _key(record: dict) -> tuple:
  """A candidate's identity: its subnet and its input resolution (the same subnet at two
  resolutions is two candidates, with two costs and two accuracies)."""
  return moves.arch_key(record["arch"]), record.get("resolution")


class _Genes:
  """Drawing, mutating and crossing candidates ``{arch, resolution}`` under the constraints,
  and scoring each distinct one once. The resolution is one more gene (OFA's ``image_size``):
  drawn uniformly, resampled with ``resolution_prob`` by mutation, taken from either parent by
  crossover; with a single resolution it never changes and draws no random numbers."""

  def __init__(self, space, fitness, cost, constraints, resolutions, rng, max_tries,
               resolution_prob):
    self.space, self.fitness, self.cost, self.constraints = space, fitness, cost, constraints
    self.resolutions, self.rng, self.max_tries = list(resolutions), rng, max_tries
    self.resolution_prob = resolution_prob
    self.seen: dict[tuple, dict] = {}   # key -> record; fitness is computed once per candidate

  def _resolution(self, *parents) -> object:
    """A child's resolution: a crossover's from either parent, a mutant's its parent's unless
    resampled (probability ``resolution_prob``), a random candidate's drawn uniformly."""
    if len(self.resolutions) == 1:
      return self.resolutions[0]
    if len(parents) == 2:
      return parents[self.rng.integers(2)]
    if parents and self.rng.random() >= self.resolution_prob:
      return parents[0]
    return self.resolutions[self.rng.integers(len(self.resolutions))]

  def draw(self, make) -> dict:
    """A candidate ``make() -> (arch or None, resolution)`` that satisfies the constraints."""
    for _ in range(self.max_tries):
      arch, resolution = make()
      if arch is None:
        continue
      c = self.cost(arch, resolution)
      if self.constraints.ok(c):
        return {"arch": arch, "resolution": resolution, **c}
    raise ValueError(f"no valid arch under {self.constraints.describe()} after {self.max_tries} "
                     "draws; the bounds are too tight for random sampling: loosen them")

  def random(self) -> dict:
    return self.draw(lambda: (self.space.random_host(self.rng), self._resolution()))

  def mutant(self, p: dict, prob: float) -> dict:
    return self.draw(lambda: (moves.mutate(self.space, p["arch"], prob, self.rng),
                              self._resolution(p["resolution"])))

  def crossover(self, a: dict, b: dict) -> dict:
    return self.draw(lambda: (moves.crossover(self.space, a["arch"], b["arch"], self.rng),
                              self._resolution(a["resolution"], b["resolution"])))

  def score(self, records: list[dict]) -> None:
    """Sets every record's "fitness"; only candidates not seen before reach ``fitness``."""
    unique = {}
    for r in records:
      unique.setdefault(_key(r), r)
    new = {k: r for k, r in unique.items() if k not in self.seen}
    if new:
      values = self.fitness([r["arch"] for r in new.values()],
                            [r["resolution"] for r in new.values()])
      for (k, r), f in zip(new.items(), values):
        self.seen[k] = dict(r, fitness=float(f))
    for r in records:
      r["fitness"] = self.seen[_key(r)]["fitness"]


def evolve(space, fitness: Callable, cost: Callable, constraints: Constraints, *,
           population: int = 100, iterations: int = 500, parent_ratio: float = 0.25,
           mutation_ratio: float = 0.5, mutation_prob: float = 0.1,
           resolutions: Sequence = (None,), resolution_mutation_prob: float | None = None,
           multi_objective: bool = False, seed: int = 0, max_tries: int = 1000,
           progress=None) -> dict:
  """Returns {"best", "population", "history", "seen"}: records {arch, resolution, fitness,
  **cost}; ``history`` has a line per generation, 0 (the initial population) to
  ``iterations``. ``fitness(archs, resolutions) -> [float]``; ``cost(arch, resolution) -> {"macs",
  "params", ...}``. ``resolution_mutation_prob`` defaults to ``mutation_prob``.

  Each generation, as OFA's ``run_evolution_search``: the ``parent_ratio`` fittest survive
  (elitism: the best fitness never falls), ``mutation_ratio * population`` mutants of random
  parents and ``population`` minus that many crossovers of two random parents join them.
  """
  if population < 2 or not 0 < parent_ratio < 1 or not 0 <= mutation_ratio <= 1:
    raise ValueError(f"need population >= 2, 0 < parent_ratio < 1, 0 <= mutation_ratio <= 1; "
                     f"got {population}, {parent_ratio}, {mutation_ratio}")
  resolution_prob = mutation_prob if resolution_mutation_prob is None else resolution_mutation_prob
  if not resolutions or not (0 <= mutation_prob <= 1 and 0 <= resolution_prob <= 1):
    raise ValueError(f"need at least one resolution (or (None,)) and mutation probabilities in "
                     f"[0, 1]; got {tuple(resolutions)}, {mutation_prob}, {resolution_prob}")
  check_feasible(space, cost, constraints, resolutions)
  rng = np.random.default_rng(seed)
  genes = _Genes(space, fitness, cost, constraints, resolutions, rng, max_tries, resolution_prob)
  pop = [genes.random() for _ in range(population)]
  genes.score(pop)
  num_parents = max(1, int(round(parent_ratio * population)))
  num_mutants = int(round(mutation_ratio * population))
  history = [_generation(0, pop, len(genes.seen))]  # 0: the random initial population
  for it in range(iterations):
    parents = select(pop, num_parents, multi_objective)
    children = [genes.mutant(parents[rng.integers(num_parents)], mutation_prob)
                for _ in range(num_mutants)]
    children += [genes.crossover(*(parents[i] for i in rng.integers(num_parents, size=2)))
                 for _ in range(population - num_mutants)]
    genes.score(children)
    pop = parents + children
    history.append(_generation(it + 1, pop, len(genes.seen)))
    if progress is not None:
      progress.update(it + 1, f"best {history[-1]['best_fitness']:.4f}, "
                      f"{len(genes.seen)} candidates scored")
  best = max(pop, key=lambda r: (r["fitness"], -r["macs"]))
  return {"best": best, "population": pop, "history": history, "seen": list(genes.seen.values())}


def _generation(iteration: int, pop: list[dict], num_seen: int) -> dict:
  """One generation's line of the history: the best and mean fitness of the population."""
  best = max(pop, key=lambda r: (r["fitness"], -r["macs"]))
  return {"iteration": iteration, "best_fitness": best["fitness"],
          "best_resolution": best.get("resolution"),
          "mean_fitness": float(np.mean([r["fitness"] for r in pop])),
          "distinct_evaluated": num_seen}


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
      at = "" if cheapest.get("resolution") is None else f" at {cheapest['resolution']}"
      raise ValueError(
          f"multi-objective evolution scored no arch at or under the MACs target {t:,.0f}: the "
          f"cheapest of its {len(records)} archs is {space.name(cheapest['arch'])}{at} with "
          f"{cheapest['macs']:,} MACs (fitness {cheapest['fitness']:.4f}). Raise the target, "
          "or give the run more iterations or a larger population to reach further down")
    chosen.append((t, max(under, key=lambda r: (r["fitness"], -r["macs"]))))
  return chosen
