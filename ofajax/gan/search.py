"""Search a generator supernet: greedy slimming (AutoSlim's, ``ofajax.search.greedy``) scored
by the Fréchet distance on the held-out images, to MACs budgets; each chosen generator exported.

``search.py`` runs this when the workdir's training config has ``task = "gan"``. A candidate is
scored by the judge (``ofajax.gan.judge``) on the edge maps training held out (the default
``train[-500:]``; a split that overlaps training is refused, as for classifiers): lower Fréchet
distance first, then higher judge accuracy. Every candidate's BatchNorm statistics are
re-estimated on training edge maps first. The chosen generators are re-scored on the test split
and written to ``<workdir>/search/<name>/subnets/<target>/`` as StableHLO (``edges -> image``,
any batch size) with their arch and scores; ``result.json`` holds the path and the rows.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from ofajax import cost, export
from ofajax.gan import data as gan_data
from ofajax.gan import evaluate
from ofajax.gan import judge as gan_judge
from ofajax.search import greedy, run
from ofajax.workdir import load_supernet, read_config


def _key(record: dict):
  # "loss" holds the Fréchet distance, "top1" the judge's accuracy (as a fraction).
  return (-record["loss"], record["top1"], -record["macs"])


def run_gan_search(config, workdir: str) -> dict:
  """Greedy slimming of the generator in ``workdir`` to ``config``'s MACs targets."""
  if config.method != "greedy":
    raise ValueError(f"generators are searched by greedy slimming: set config.method='greedy' "
                     f"(configs/search/gan.py), got {config.method!r}")
  t_start = time.time()
  train = read_config(workdir)
  data_splits = run.scoring_splits(config, train)
  sup = load_supernet(workdir, None if config.checkpoint_step < 0 else config.checkpoint_step)
  data_dir = train.get("data_dir") or None
  load = lambda split: gan_data.load_pairs(split, data_dir, train.dataset)  # noqa: E731
  calib = evaluate.calibration_edges(load(data_splits["calib"]), config.calib_batch_size,
                                     config.calib_batches, config.seed)
  valid = load(data_splits["valid"])
  judge = gan_judge.get_judge(data_dir, gan_judge.settings_with(train.gan.get("judge")))
  resolution = int(train.resolution)

  def score(archs):
    records = evaluate.score(sup.model, sup.variables, [("", a) for a in archs], valid, calib,
                             judge, resolution)
    return [{"loss": r["frechet"], "top1": r["accuracy"] / 100} for r in records]

  counted = lambda arch: cost.count(sup.model, arch, resolution)  # noqa: E731
  targets = run._targets(config, counted(sup.space.largest())["macs"])  # pylint: disable=protected-access
  found = greedy.greedy_search(sup.space, score, counted, targets,
                               granularity=config.greedy.granularity,
                               bin_steps=config.greedy.bin_steps, key=_key)
  out_dir = os.path.join(workdir, "search", config.name)
  os.makedirs(out_dir, exist_ok=True)
  test = load(config.test_split or train.test_split)
  rows = [_export_chosen(sup, target, record, calib, test, judge, resolution, out_dir)
          for target, record in found["chosen"].items()]
  result = {"model": train.model, "targets_macs": targets, "valid_split": data_splits["valid"],
            "chosen": rows, "path": [_public(r) for r in found["path"]],
            "num_evaluated": len(found["evaluated"]), "seconds": round(time.time() - t_start, 1)}
  with open(os.path.join(out_dir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(evaluate.format_records(rows))
  print(f"results in {out_dir} ({result['seconds']:.0f} s)")
  return result


def _public(record: dict) -> dict:
  out = {k: v for k, v in record.items() if k not in ("arch", "loss", "top1")}
  out.update(arch={k: np.asarray(v).tolist() for k, v in record["arch"].items()},
             valid_frechet=record["loss"], valid_accuracy=100 * record["top1"])
  return out


def _export_chosen(sup, target, record, calib, test, judge, resolution, out_dir) -> dict:
  """Scores a chosen generator on the test split and writes its StableHLO, arch and scores."""
  arch = sup.space.validate(record["arch"])
  label = f"macs_{int(target)}"
  [row] = evaluate.score(sup.model, sup.variables, [(label, arch)], test, calib, judge,
                         resolution)
  row.update(target_macs=target, valid_frechet=record["loss"],
             valid_accuracy=100 * record["top1"])
  path = os.path.join(out_dir, "subnets", label)
  os.makedirs(path, exist_ok=True)
  variables = evaluate.calibrated(sup.model, sup.variables, arch, calib)
  dense_model, dense_variables = export.extract_subnet(sup.model, variables, arch, sup.space)
  export.save_stablehlo(dense_model, dense_variables, os.path.join(path, "model.stablehlo"),
                        resolution)
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(row, f, indent=1)
  return row
