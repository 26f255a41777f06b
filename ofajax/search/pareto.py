"""Pareto fronts of (score up, cost down): the archs no other arch beats on both at once."""

from __future__ import annotations

import numpy as np


def dominates(a, b) -> bool:
  """a = (score, cost) dominates b: no worse on both, better on one."""
  return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def front(scores, costs) -> list[int]:
  """Indices of the non-dominated points, by ascending cost."""
  order = np.lexsort((-np.asarray(scores, float), np.asarray(costs, float)))
  out, best = [], -np.inf
  for i in order:  # by cost, then score: a point is on the front if it beats every cheaper one
    if scores[i] > best:
      out.append(int(i))
      best = scores[i]
  return out


def ranks(scores, costs) -> np.ndarray:
  """Non-dominated sorting (NSGA-II): 0 for the front, 1 for the front of the rest, ..."""
  n = len(scores)
  rank = np.full(n, -1)
  left = list(range(n))
  r = 0
  while left:
    sub = front([scores[i] for i in left], [costs[i] for i in left])
    for j in sub:
      rank[left[j]] = r
    chosen = {left[j] for j in sub}
    left = [i for i in left if i not in chosen]
    r += 1
  return rank


def crowding(scores, costs) -> np.ndarray:
  """NSGA-II crowding distance within one set of points (larger = lonelier = kept first)."""
  n = len(scores)
  dist = np.zeros(n)
  for values in (np.asarray(scores, float), np.asarray(costs, float)):
    order = np.argsort(values)
    span = values[order[-1]] - values[order[0]] or 1.0
    dist[order[0]] = dist[order[-1]] = np.inf
    for k in range(1, n - 1):
      dist[order[k]] += (values[order[k + 1]] - values[order[k - 1]]) / span
  return dist


def cost_bounds(config) -> dict:
  """The search's upper bounds on costs other than MACs, {key: bound}; unset ones (0) left out."""
  return {k: v for k, v in (("params", config.max_params),
                            ("latency_ms", config.max_latency_ms)) if v}


def within_bounds(config, record: dict) -> bool:
  """Whether a measured ``record`` meets every bound of :func:`cost_bounds`."""
  return all(record.get(k, 0.0) <= v for k, v in cost_bounds(config).items())
