"""GAN compression on the paired edges -> digit task: every stage's default config, one run each.

Rows (test split, 1,000 images; Fréchet distance and accuracy of the digit judge,
``ofajax.gan.judge``):

* ``original``: the pix2pix ResNet generator (configs/gan_resnet.py);
* ``mobile_resnet``: GAN Compression's MobileResNet generator trained directly (gan_mobile.py);
* ``pruned_distilled``: MobileResNet pruned to half of every channel group by filter L1 norm
  (prune.py), fine-tuned with feature distillation from the unpruned one (gan_pruned.py);
* ``supernet_<fraction>``: subnets of the supernet over the pruned generator's channels
  (gan_supernet.py), chosen by greedy slimming at 3 MACs budgets (configs/search/gan.py);
* ``l1_distilled_<fraction>`` (the ablation): the stage-2 generator pruned by filter L1 to each
  chosen subnet's widths (the same MACs), fine-tuned with the same distillation and teacher as
  the supernet, for the stage-2 schedule.

  python bench/bench_gan_compression.py --workdir /tmp/gan_bench

A stage whose workdir is complete is re-evaluated, not retrained. Writes the table and
``bench/results/gan_compression.json``: a list of rows {"name", "macs", "params", "frechet",
"accuracy", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import gan_mobile, gan_pruned, gan_resnet, gan_supernet  # noqa: E402
from configs.search import gan as gan_search_config  # noqa: E402
from ofajax import prune  # noqa: E402
from ofajax.gan.search import run_gan_search  # noqa: E402
from ofajax.gan.train import train_and_evaluate  # noqa: E402
from ofajax.workdir import load_supernet  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "gan_compression.json")
COLUMNS = ("name", "macs", "params", "frechet", "accuracy")


def stage(name: str, config, workdir: str, timings: dict) -> dict:
  """Trains (or resumes / re-evaluates) one stage; returns its largest subnet's record."""
  start = time.time()
  records = train_and_evaluate(config, workdir)
  timings[name] = round(time.time() - start, 1)
  return records[0]


def with_weights(config, weights: str, **overrides):
  config.model_options.factory_options.weights = weights
  for k, v in overrides.items():
    config[k] = v
  return config


def row(name: str, record: dict, **extra) -> dict:
  return {**{k: record[k] for k in COLUMNS[1:]}, "name": name, **extra}


def ablation(work: str, chosen: list[dict], timings: dict) -> list[dict]:
  """The L1-pruned + distilled baseline at each chosen subnet's widths."""
  stage3 = load_supernet(os.path.join(work, "supernet")).model   # widths the search chose from
  stage2 = jax.device_get(load_supernet(os.path.join(work, "pruned")).variables)
  rows = []
  for chosen_row, fraction in chosen:
    label = f"l1_distilled_{fraction:g}"
    pruned = prune.prune_to_arch(stage3, stage2, chosen_row["arch"])
    weights_dir = os.path.join(work, label + "_weights")
    prune.save_pruned(pruned, weights_dir)
    config = with_weights(gan_pruned.get_config(), os.path.join(weights_dir, "pruned.msgpack"),
                          teacher_workdir=os.path.join(work, "pruned"))
    record = stage(label, config, os.path.join(work, label), timings)
    rows.append(row(label, record, target_fraction=fraction))
  return rows


def main(args) -> list[dict]:
  work, timings = args.workdir, {}
  os.makedirs(work, exist_ok=True)
  path = lambda name: os.path.join(work, name)  # noqa: E731
  rows = [row("original", stage("original", gan_resnet.get_config(), path("resnet"), timings))]
  rows.append(row("mobile_resnet", stage("mobile_resnet", gan_mobile.get_config(),
                                         path("mobile"), timings)))
  pruned = prune.prune_workdir(path("mobile"), path("pruned_weights"), keep=0.5)
  weights = os.path.join(path("pruned_weights"), "pruned.msgpack")
  config = with_weights(gan_pruned.get_config(), weights, teacher_workdir=path("mobile"))
  rows.append(row("pruned_distilled", stage("pruned_distilled", config, path("pruned"),
                                            timings), pruned_before_finetune_macs=pruned.macs_after))
  config = with_weights(gan_supernet.get_config(), weights, teacher_workdir=path("pruned"),
                        init_workdir=path("pruned"))
  stage("supernet", config, path("supernet"), timings)
  search = gan_search_config.get_config()
  start = time.time()
  result = run_gan_search(search, path("supernet"))
  timings["search"] = round(time.time() - start, 1)
  fractions = sorted(search.target_fractions, reverse=True)
  chosen = sorted(result["chosen"], key=lambda r: -r["target_macs"])
  for r, fraction in zip(chosen, fractions):
    rows.append(row(f"supernet_{fraction:g}", r, target_fraction=fraction, arch=r["arch"]))
  rows += ablation(work, list(zip(chosen, fractions)), timings)
  _report(rows, timings)
  return rows


def _report(rows: list[dict], timings: dict) -> None:
  original = rows[0]
  print(f"\n{'generator':<22} {'MACs':>11} {'x fewer':>8} {'params':>8} {'Frechet':>9} "
        f"{'accuracy':>9}")
  for r in rows:
    r["macs_reduction"] = round(original["macs"] / r["macs"], 2)
    print(f"{r['name']:<22} {r['macs']:>11,} {r['macs_reduction']:>8.2f} {r['params']:>8,} "
          f"{r['frechet']:>9.2f} {r['accuracy']:>9.2f}")
  print("seconds per stage:", json.dumps(timings))
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as f:
    json.dump(rows, f, indent=1)
  with open(RESULTS.replace(".json", "_timings.json"), "w") as f:
    json.dump(timings, f, indent=1)
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/gan_bench")
  main(parser.parse_args())
