"""Scoring generators: subnets of a generator supernet, BN-calibrated, judged on a paired split.

Each subnet's BatchNorm statistics are re-estimated on training edge maps (as a classifier
subnet's are, ``ofajax.bn``): the supernet's running statistics fit no subnet in particular.
Then its outputs on the split's edge maps are judged (``ofajax.gan.judge``): the Fréchet
distance of the judge's features to the real digits', and the judge's accuracy on them.
"""

from __future__ import annotations

import jax
import numpy as np

from ofajax import bn, cost
from ofajax.gan import data as gan_data
from ofajax.gan import judge as gan_judge


def calibration_edges(pairs: gan_data.PairedSet, batch_size: int, num_batches: int,
                      seed: int) -> np.ndarray:
  """[num_batches, batch, H, W, C] training edge maps, a seeded draw without replacement."""
  count = min(len(pairs.edges), batch_size * num_batches)
  index = np.random.default_rng(seed).permutation(len(pairs.edges))[:count]
  usable = count // batch_size * batch_size
  if usable == 0:
    raise ValueError(f"BN calibration needs at least one batch of {batch_size} edge maps; the "
                     f"training split has {len(pairs.edges)}")
  return pairs.edges[index[:usable]].reshape((-1, batch_size) + pairs.edges.shape[1:])


# The arch is an argument (traced), so every subnet shares one compiled function.
_calibrate = jax.jit(bn.calibrate_one, static_argnums=0)
_forward = jax.jit(lambda model, variables, arch, x: model.apply(variables, x, arch, train=False),
                   static_argnums=0)


def calibrated(model, variables: dict, arch, calib: np.ndarray | None) -> dict:
  """``variables`` with one subnet's BatchNorm statistics re-estimated on ``calib``."""
  if calib is None or not variables.get("batch_stats"):
    return variables
  return {"params": variables["params"],
          "batch_stats": _calibrate(model, variables, arch, calib)}


def make_generate(model, variables: dict, arch, calib: np.ndarray | None):
  """``edges -> images`` of one subnet (its statistics calibrated on ``calib``)."""
  variables = calibrated(model, variables, arch, calib)
  return lambda edges: np.asarray(_forward(model, variables, arch, edges))


def score(model, variables: dict, named_archs: list, eval_pairs: gan_data.PairedSet,
          calib: np.ndarray | None, judge: gan_judge.Judge, resolution: int) -> list[dict]:
  """One record per (name, arch): MACs, params, Fréchet distance, judge accuracy."""
  records = []
  for name, arch in named_archs:
    generate = make_generate(model, variables, arch, calib)
    scores = gan_judge.score_generator(generate, eval_pairs, judge)
    c = cost.count(model, arch, resolution)
    records.append({"name": name, "arch": {k: np.asarray(v).tolist() for k, v in arch.items()},
                    "macs": c["macs"], "params": c["params"], "frechet": scores["frechet"],
                    "accuracy": scores["accuracy"]})
  return records


def format_records(records: list[dict]) -> str:
  lines = [f"{'subnet':<28} {'MACs':>12} {'params':>9} {'Frechet':>9} {'accuracy':>9}"]
  for r in records:
    lines.append(f"{r['name'][:28]:<28} {r['macs']:>12,} {r['params']:>9,} "
                 f"{r['frechet']:>9.3f} {r['accuracy']:>9.2f}")
  return "\n".join(lines)
