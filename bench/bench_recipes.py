"""The recipes against each other on the shipped MNIST sample, with the same total epochs.

Runs, each on the default tiny OFA-MobileNetV3 supernet (seed 0, batch 128, 2 CPU cores):

* ``teacher``: the full network alone for ``--teacher_epochs`` (counted in the OFA and CompOFA
  budgets);
* ``ofa_from_full``: OFA's progressive shrinking (kernel -> depth -> expand, phases in OFA's
  epoch proportions, channel sorting before the expand phases), starting from the teacher's
  weights and distilled from it, for the rest of the budget;
* ``ofa_from_random``: the same phases over the whole budget from a random init, distilled from
  the same teacher (whose epochs it does not pay for);
* ``sandwich``: the default one-shot recipe (sandwich rule, in-place distillation) for the whole
  budget;
* ``compofa``: CompOFA's two phases from the teacher's weights for the rest of the budget.

Each run's final evaluation (BN calibrated, 1,000 test images) gives the largest, the smallest
and 8 random subnets' top-1. Prints a table and writes JSON.

    PYTHONPATH=. python bench/bench_recipes.py --epochs 24 --teacher_epochs 8
"""

from __future__ import annotations

import argparse
import json
import os
import time

import ml_collections
import numpy as np

from configs import default
from ofajax.train import train_and_evaluate

# OFA's epochs per phase (train_ofa_net.py): kernel 120, depth 25 + 120, expand 25 + 120.
OFA_PROPORTIONS = (120, 25, 120, 25, 120)


def _phase(name, epochs, lr, subnets, sampling="random", sort_channels=False, expand_stage=0,
           **restrict):
  return ml_collections.ConfigDict({
      "name": name, "epochs": epochs, "learning_rate": lr, "warmup_epochs": 0.0,
      "num_subnets": subnets, "sampling": sampling, "sort_channels": sort_channels,
      "expand_stage": expand_stage, "restrict": restrict})


def base_config(data_dir: str):
  c = default.get_config()
  c.model = "ofa_mbv3_tiny"  # the recipes compare on OFA's space (CompOFA's arm sets its own)
  c.data_dir = data_dir
  return c


def run_configs(epochs: float, teacher_epochs: float, workdir: str, data_dir: str) -> dict:
  lr = default.get_config().learning_rate
  teacher_dir = os.path.join(workdir, "teacher")
  configs = {}
  c = base_config(data_dir)
  _, full = _tiny_extremes()
  c.distill = "none"
  c.phases = [_phase("teacher", teacher_epochs, lr, 1, **full)]
  configs["teacher"] = c
  rest = epochs - teacher_epochs
  for name, phase_epochs, init in [("ofa_from_full", rest, teacher_dir),
                                   ("ofa_from_random", epochs, "")]:
    c = base_config(data_dir)
    c.distill, c.teacher_workdir, c.init_workdir = "teacher", teacher_dir, init
    c.phases = _ofa_tiny_phases(phase_epochs, lr)
    configs[name] = c
  configs["sandwich"] = base_config(data_dir)
  configs["sandwich"].num_epochs = epochs
  c = base_config(data_dir)
  c.model = "compofa_mbv3_tiny"
  c.model_options.kernel_transform = False
  c.distill, c.teacher_workdir, c.init_workdir = "teacher", teacher_dir, teacher_dir
  c.phases = [_phase("compound1", rest * 25 / 145, lr / 12, 4, sort_channels=True),
              _phase("compound2", rest * 120 / 145, lr / 4, 4, sort_channels=True)]
  configs["compofa"] = c
  return configs


def _tiny_extremes():
  from ofajax import models  # pylint: disable=g-import-not-at-top
  _, space = models.get("ofa_mbv3_tiny", num_classes=10)
  values = {leaf.name: leaf.values for leaf in space.leaves}
  return values, {k: [max(v)] for k, v in values.items()}


def _ofa_tiny_phases(epochs: float, lr: float) -> list:
  """OFA's phases on the tiny space (its own depth / kernel / expand values)."""
  values, _ = _tiny_extremes()
  d, e = values["depth"], values["expand"]
  ep = [epochs * p / sum(OFA_PROPORTIONS) for p in OFA_PROPORTIONS]
  # OFA's per-phase rates relative to its kernel phase: 0.96 -> 0.08 / 0.24.
  return [_phase("kernel", ep[0], lr, 1, depth=[max(d)], expand=[max(e)]),
          _phase("depth1", ep[1], lr / 12, 2, depth=list(d[-2:]), expand=[max(e)]),
          _phase("depth2", ep[2], lr / 4, 2, expand=[max(e)]),
          _phase("expand1", ep[3], lr / 12, 4, sort_channels=True, expand=list(e[-2:])),
          _phase("expand2", ep[4], lr / 4, 4, sort_channels=True, expand_stage=1)]


def summarise(records: list[dict]) -> dict:
  by_name = {r["name"]: r for r in records}
  random = [r for r in records if r["name"] not in ("largest", "smallest")]
  return {"largest": by_name["largest"]["top1"], "smallest": by_name["smallest"]["top1"],
          "random_min": min(r["top1"] for r in random) if random else None,
          "random_median": float(np.median([r["top1"] for r in random])) if random else None,
          "random_max": max(r["top1"] for r in random) if random else None,
          "records": [{k: r[k] for k in ("name", "macs", "top1")} for r in records]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=float, default=24.0)
  parser.add_argument("--teacher_epochs", type=float, default=8.0)
  parser.add_argument("--workdir", default="/tmp/bench_recipes")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--only", default="", help="comma-separated run names")
  parser.add_argument("--out", default="bench/results/recipes.json")
  args = parser.parse_args()
  configs = run_configs(args.epochs, args.teacher_epochs, args.workdir, args.data_dir)
  only = [n for n in args.only.split(",") if n] or list(configs)
  results = {}
  for name in only:
    start = time.perf_counter()
    records = train_and_evaluate(configs[name], os.path.join(args.workdir, name))
    results[name] = {**summarise(records), "seconds": time.perf_counter() - start}
  print(f"\n{'run':18s} {'largest':>8s} {'smallest':>9s} {'random min/median/max':>24s} {'s':>6s}")
  for name, r in results.items():
    spread = (f"{r['random_min']:.3f}/{r['random_median']:.3f}/{r['random_max']:.3f}"
              if r["random_min"] is not None else "-")
    print(f"{name:18s} {r['largest']:8.3f} {r['smallest']:9.3f} {spread:>24s} "
          f"{r['seconds']:6.0f}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"epochs": args.epochs, "teacher_epochs": args.teacher_epochs, "runs": results},
              f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
