"""OFA's evolutionary search with an accuracy predictor, one run per MACs target.

The predictor is fitted on ``predictor.num_archs`` random candidates measured by the engine (its
held-out RMSE and Kendall tau go to result.json); evolution then ranks candidates with it, and
the chosen candidate of every target is measured directly. A candidate is an arch and, when
the supernet trained at several resolutions, an input resolution (``config.resolutions``).
``--config.evolution.fitness=measured`` scores every candidate with the engine instead (slower;
use a smaller population and fewer iterations).
``--config.evolution.multi_objective=True`` evolves one population along the whole
accuracy-vs-MACs front (NSGA-II ranking) and picks each target's arch from it.

The defaults are OFA's (mit-han-lab/once-for-all, ``ofa/nas/search_algorithm/evolution.py``,
``EvolutionFinder``; the same in ``ofa/tutorial/evolution_finder.py``). A quick run:
``--config.evolution.iterations=50``.
"""

import ml_collections

from configs.search.common import base_config


def get_config():
  c = base_config("evolution", "evolution")
  c.evolution = ml_collections.ConfigDict({
      "fitness": "predictor",     # "predictor" | "measured"
      # max_time_budget = 500 generations (evolution.py)
      "iterations": 500,
      # population_size = 100 (evolution.py)
      "population": 100,
      # parent_ratio = 0.25: the 25 fittest survive each generation (evolution.py)
      "parent_ratio": 0.25,
      # mutation_ratio = 0.5: 50 mutants, and population - 50 = 50 crossovers, per generation
      # (evolution.py: mutation_numbers, then population_size - mutation_numbers)
      "mutation_ratio": 0.5,
      # arch_mutate_prob = 0.1: each position resampled with this probability (evolution.py;
      # mutate_prob in tutorial/evolution_finder.py)
      "mutation_prob": 0.1,
      # the resolution gene's: 0.1 as tutorial/evolution_finder.py (mutate_prob for every gene);
      # nas/search_algorithm/evolution.py's resolution_mutate_prob is 0.5
      "resolution_mutation_prob": 0.1,
      "multi_objective": False})
  c.predictor = ml_collections.ConfigDict({
      # Measured candidates that fit the accuracy predictor (20% of them held out to report its
      # RMSE / Kendall tau, then refitted on all). OFA: 16k subnets (paper, Sec. 3.4; the code,
      # nas/accuracy_predictor/acc_dataset.py, measures n_arch=1000 archs at 4 image sizes).
      # 200 here: each costs one BN calibration + validation pass (about 0.2 s on the default
      # workdir); raise it on an accelerator.
      "num_archs": 200,
      "holdout_fraction": 0.2,
      "hidden": (400, 400, 400),  # OFA's MLP: 3 x 400 ReLU units (acc_predictor.py)
      "steps": 500, "learning_rate": 1e-3})
  return c
