"""bench/bench_prune_baseline.py on the tiny trained supernet: its MACs matching lands near the
target, and its fine-tune (through ofajax.train) recovers accuracy that pruning lost."""

import os
import shutil
import sys

import jax
import numpy as np

from ofajax import channel_sorting, cost
from ofajax.workdir import load_supernet

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import bench_prune_baseline as bench  # noqa: E402

# The search settings the bench reads from a search's config.json (calibration as search's).
SEARCH = {"calib_split": "", "calib_batch_size": 32, "calib_batches": 2, "seed": 0,
          "test_split": "", "valid_batch_size": 120}


def test_pruned_baseline_matches_macs_and_finetune_recovers(trained_workdir, tmp_path):
  source, _ = trained_workdir
  workdir = str(tmp_path / "supernet")
  shutil.copytree(source, workdir)   # the shared workdir is read-only to tests
  sup = load_supernet(workdir)
  model = bench.pruning_model(sup)
  largest = sup.space.to_host(sup.space.largest())
  full = cost.count(model, largest, 8)["macs"]
  # A target between two uniform expand ratios, so only the per-block raises can reach it.
  target = 0.45 * full
  arch, macs = bench.match_arch(model, largest, target, 8)
  assert abs(macs / target - 1) < 0.02, (macs, target)
  assert macs == cost.count(model, arch, 8)["macs"]
  assert len(np.unique(arch["expand"])) == 2   # lo and hi both used
  assert np.array_equal(arch["depth"], largest["depth"])   # pruning keeps every block

  variables = jax.device_get(sup.variables)
  ranked = channel_sorting.sort_channels(model, variables)
  pruned = bench.test_top1(model, ranked, arch, sup.config, SEARCH)
  config = bench.finetune_config(sup.config, workdir, model, arch, epochs=0.5,
                                 learning_rate=0.05)
  tuned = bench.finetune(config, str(tmp_path / "finetune"))
  finetuned = bench.test_top1(model, tuned, arch, sup.config, SEARCH)
  assert finetuned > pruned + 0.02, (pruned, finetuned)
