"""OFA's evolutionary search with an accuracy predictor, one run per MACs target.

The predictor is fitted on ``predictor.num_archs`` random archs measured by the engine (its
held-out RMSE and Kendall tau go to result.json); evolution then ranks candidates with it, and
the chosen arch of every target is measured directly. ``--config.evolution.fitness=measured``
scores every candidate with the engine instead (slower; use a smaller population).
``--config.evolution.multi_objective=True`` evolves one population along the whole
accuracy-vs-MACs front (NSGA-II ranking) and picks each target's arch from it.
"""

import ml_collections

from configs.search.common import base_config


def get_config():
  c = base_config("evolution", "evolution")
  c.evolution = ml_collections.ConfigDict({
      "fitness": "predictor",   # "predictor" | "measured"
      "population": 100, "iterations": 100, "parent_ratio": 0.25, "mutation_ratio": 0.5,
      "mutation_prob": 0.1, "multi_objective": False})
  c.predictor = ml_collections.ConfigDict({
      "num_archs": 200, "holdout_fraction": 0.2, "hidden": (400, 400, 400), "steps": 500,
      "learning_rate": 1e-3})
  return c
