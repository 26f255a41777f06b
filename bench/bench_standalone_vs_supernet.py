"""Supernet subnets against the same archs trained alone, with the same budget (slimmable nets'
claim: within about 1 point).

Trains the default config's supernet (or reads an existing workdir's eval.json), then trains the
largest and the smallest arch each as an ordinary network: the same config, epochs and batch,
one subnet per step, no distillation, the space restricted to that single arch. Prints a table
and writes JSON.

    PYTHONPATH=. python bench/bench_standalone_vs_supernet.py [--supernet_workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import ml_collections
import numpy as np

from configs import default
from ofajax import models
from ofajax.train import train_and_evaluate


def supernet_config():
  c = default.get_config()
  c.model = "ofa_mbv3_tiny"  # the supernet docs/benchmarks.md measured
  return c


def standalone_config(arch_name: str):
  c = supernet_config()
  _, space = models.get(c.model, **dict(c.model_options))
  arch = space.largest() if arch_name == "largest" else space.smallest()
  restrict = {leaf: [int(np.unique(np.asarray(v))[0])] if len(np.unique(np.asarray(v))) == 1
              else np.asarray(v)[..., None].tolist() for leaf, v in arch.items()}
  c.distill = "none"
  c.phases = [ml_collections.ConfigDict({
      "name": f"standalone-{arch_name}", "epochs": c.num_epochs, "learning_rate": c.learning_rate,
      "warmup_epochs": 1.0, "num_subnets": 1, "sampling": "random", "restrict": restrict})]
  c.eval.num_random_subnets = 0
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  here = os.path.dirname(__file__)
  p.add_argument("--workdir", default=os.path.join(here, "results", "standalone"))
  p.add_argument("--supernet_workdir", default="",
                 help="a finished default-config run; default: train one under --workdir")
  p.add_argument("--out", default=os.path.join(here, "results", "standalone_vs_supernet.json"))
  args = p.parse_args()
  sup_dir = args.supernet_workdir or os.path.join(args.workdir, "supernet")
  if not os.path.exists(os.path.join(sup_dir, "eval.json")):
    train_and_evaluate(supernet_config(), sup_dir)
  supernet = {r["name"]: r for r in json.load(open(os.path.join(sup_dir, "eval.json")))}
  rows = []
  for name in ("largest", "smallest"):
    records = train_and_evaluate(standalone_config(name),
                                 os.path.join(args.workdir, f"standalone_{name}"))
    alone = {r["name"]: r for r in records}[name]
    rows.append({"arch": name, "macs": alone["macs"], "standalone_top1": alone["top1"],
                 "supernet_top1": supernet[name]["top1"],
                 "difference_points": 100 * (supernet[name]["top1"] - alone["top1"])})
  print(f"{'arch':<10}{'MACs':>12}{'standalone':>12}{'supernet':>10}{'diff (pt)':>11}")
  for r in rows:
    print(f"{r['arch']:<10}{r['macs']:>12,}{100 * r['standalone_top1']:>11.2f}%"
          f"{100 * r['supernet_top1']:>9.2f}%{r['difference_points']:>+11.2f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"rows": rows, "supernet_workdir": sup_dir}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
