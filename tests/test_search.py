"""Search on a tiny trained supernet (digits 8x8): greedy, evolution, predictor, latency, export,
bad input."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.search import autoslim, evolution as evolution_config
from ofajax import cost, evaluation, export, models
from ofajax import train as training
from ofajax.search import evolution, moves, pareto
from ofajax.search.latency import LatencyTable
from ofajax.search.predictor import fit_and_report, kendall_tau
from ofajax.search.run import run_search, search_evaluator
from ofajax.workdir import load_supernet
from conftest import rel_err
from test_train import data_dir, tiny_config  # noqa: F401  (data_dir is a fixture)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):  # noqa: F811
  """The tiny supernet of test_train after 8 of its 12 steps (same config: the compiled train
  step is shared through the persistent compilation cache; stopping early skips its final
  evaluation, which search does not need)."""
  path = str(tmp_path_factory.mktemp("trained"))
  training.train_and_evaluate(tiny_config(data_dir, stop_after_steps=8), path)
  return path


def search_config(base, **overrides):
  c = base.get_config()
  c.calib_split, c.calib_batches, c.calib_batch_size = "train[:-360]", 1, 32
  # 360 validation images in 3 batches of 120: the test split has the same shape, so the
  # engine's one compiled function also reports test top-1.
  c.valid_split, c.valid_batch_size = "train[-360:]", 120
  c.engine.chunk_size = 4
  for k, v in overrides.items():
    c[k] = v
  return c


def test_greedy_reaches_targets_compiles_once_and_exports_exactly(workdir):
  config = search_config(autoslim, target_fractions=(0.8, 0.55))
  before = [f._cache_size() for f in (evaluation._calibrate_chunk, evaluation._score_chunk)]
  result = run_search(config, workdir)
  path = result["path"]
  assert len(path) > 3
  macs = [r["macs"] for r in path]
  assert all(a > b for a, b in zip(macs, macs[1:])), macs
  assert len(result["chosen"]) == 2
  for row in result["chosen"]:
    assert row["macs"] <= row["target_macs"]
    assert 0 <= row["test_top1"] <= 1
  # Every round and the test report went through one compiled function of each kind.
  after = [f._cache_size() for f in (evaluation._calibrate_chunk, evaluation._score_chunk)]
  assert all(a - b <= 1 for a, b in zip(after, before)), (before, after)
  assert result["engine"]["num_calls"] > len(path)

  out = os.path.join(workdir, "search", "autoslim")
  for name in ("result.json", "pareto.png", "config.json"):
    assert os.path.exists(os.path.join(out, name))
  saved = json.load(open(os.path.join(out, "result.json")))
  assert len(saved["evaluated"]) == result["engine"]["num_evaluated"]

  # The exported subnet scores exactly what the engine said, on the same validation split.
  sup = load_supernet(workdir)
  valid = search_evaluator(config, sup, config.valid_split)
  images, labels, mask = (jnp.concatenate([b[k] for b in valid.eval_batches])
                          for k in ("inputs", "label", "mask"))
  for row in result["chosen"]:
    served = export.load_stablehlo(os.path.join(row["export_dir"], "model.stablehlo"))
    top1 = float(jnp.sum((jnp.argmax(served(images), -1) == labels) * mask)) / valid.num_examples
    assert top1 == row["top1"]
    arch = sup.space.from_json(open(os.path.join(row["export_dir"], "arch.json")).read())
    dense = sup.model.dense_model(arch)
    with ocp.StandardCheckpointer() as ckpt:
      variables = ckpt.restore(os.path.join(os.path.abspath(row["export_dir"]), "variables"))
    logits = dense.apply(variables, images, train=False)
    # two compilations of the same float32 program (export traces with a symbolic batch):
    # round-off only; measured 1.1e-5 on one trained workdir
    assert rel_err(logits, served(images)) <= 3e-5
    assert cost.count(sup.model, arch, 8)["macs"] == row["macs"]


def test_evolution_respects_constraints_and_is_deterministic(workdir):
  sup = load_supernet(workdir)
  smallest = cost.count(sup.model, sup.space.smallest(), 8)
  largest = cost.count(sup.model, sup.space.largest(), 8)
  max_params = (smallest["params"] + largest["params"]) // 2
  config = search_config(evolution_config, target_fractions=(0.7, 0.5), max_params=max_params,
                         export=False, report_test=False)
  config.evolution.update(fitness="measured", population=8, iterations=3)
  first = run_search(config, workdir)
  for run in first["evolution"]:
    assert len(run["history"]) == 3
  for row in first["chosen"]:
    assert row["macs"] <= row["target_macs"] and row["params"] <= max_params
  # every arch the constrained runs proposed was scored, and all satisfy the params bound
  assert all(r["params"] <= max_params for r in first["evaluated"])
  second = run_search(config, workdir)
  strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
  assert strip(first) == strip(second)


def test_multi_objective_evolution_returns_a_front(workdir):
  config = search_config(evolution_config, target_fractions=(0.9, 0.6), export=False,
                         report_test=False, name="pareto")
  config.evolution.update(fitness="measured", population=8, iterations=2, multi_objective=True)
  result = run_search(config, workdir)
  front = result["front"]
  assert len(front) >= 2
  for a in front:  # nothing measured dominates a front point
    assert not any(pareto.dominates((b["top1"], b["macs"]), (a["top1"], a["macs"]))
                   for b in result["evaluated"])
  for row in result["chosen"]:
    assert row["macs"] <= row["target_macs"]


def test_multi_objective_choice_names_an_unreached_target():
  """A multi-objective run answers every target from the archs it scored; a target below all
  of them used to end in ``max() arg is an empty sequence``."""
  _, space = models.get("ofa_mbv3_tiny")
  rng = np.random.default_rng(0)
  records = [{"arch": space.random_host(rng), "macs": m, "fitness": f}
             for m, f in [(300, 0.9), (200, 0.7), (200, 0.8), (150, 0.6)]]
  chosen = evolution.fittest_under(space, records, [210.0, 400.0])
  assert [(t, r["macs"], r["fitness"]) for t, r in chosen] == [(210.0, 200, 0.8),
                                                                (400.0, 300, 0.9)]
  cheapest = re.escape(space.name(records[3]["arch"]))
  with pytest.raises(ValueError, match=rf"MACs target 100: the cheapest of its 4 archs is "
                     rf"{cheapest} with 150 MACs \(fitness 0.6000\)"):
    evolution.fittest_under(space, records, [100.0, 400.0])


def test_predictor_ranks_a_learnable_accuracy():
  _, space = models.get("ofa_mbv3_tiny")
  rng = np.random.default_rng(0)
  archs = [space.random_host(rng) for _ in range(120)]
  # a smooth function of the arch, as accuracy roughly is of capacity
  truth = [0.5 + 0.02 * float(np.sum(a["depth"])) +
           0.003 * float(np.sum(a["expand"] * space.active(a, "expand"))) +
           0.001 * float(np.sum(a["kernel"] * space.active(a, "kernel"))) for a in archs]
  predictor, report = fit_and_report(space, archs, truth, holdout_fraction=0.25)
  assert report["num_test"] == 30
  assert report["kendall_tau"] > 0.7
  assert report["rmse"] < report["constant_baseline_rmse"]
  assert predictor(archs[:3]).shape == (3,)
  assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_moves_keep_archs_valid_in_a_coupled_space():
  model, space = models.get("compofa_mbv3_tiny")
  rng = np.random.default_rng(1)
  a, b = space.random_host(rng), space.random_host(rng)
  for arch in [moves.mutate(space, a, 0.5, rng), moves.crossover(space, a, b, rng)]:
    if arch is not None:
      space.validate(arch)
  base = cost.count(model, a, 28)["macs"]
  shrunk = list(moves.shrink_moves(space, a))
  assert shrunk
  for _, arch in shrunk:
    space.validate(arch)  # depth moves drag the coupled expand along
    assert cost.count(model, arch, 28)["macs"] < base


def test_latency_table_predicts_and_rejects_another_model(tmp_path):
  model, space = models.get("ofa_mbv3_tiny", depth_choices=(1, 2))  # few blocks: few compiles
  table = LatencyTable("ofa_mbv3_tiny", model, 28, batch_size=2, warmup=1, repeats=3)
  arch = space.to_host(space.smallest())
  assert table.measure([arch]) == len(table.entries) > 2
  predicted = table.predict(arch)
  assert predicted > 0 and table.measure_direct(arch) > 0
  path = str(tmp_path / "latency.json")
  table.save(path)
  again = LatencyTable.load(path, "ofa_mbv3_tiny", model, 28, 2)
  assert again.predict(arch) == predicted
  other, _ = models.get("slim_mobilenet_v2_tiny")
  with pytest.raises(ValueError, match="built for another setting.*model"):
    LatencyTable.load(path, "slim_mobilenet_v2_tiny", other, 28, 2)
  with pytest.raises(KeyError, match="not in the latency table"):
    table.predict(space.to_host(space.largest()))


def test_target_below_the_smallest_subnet_names_it(workdir):
  sup = load_supernet(workdir)
  smallest = cost.count(sup.model, sup.space.smallest(), 8)["macs"]
  config = search_config(autoslim, target_macs=(smallest - 1,))
  with pytest.raises(ValueError, match=f"smallest subnet.*{smallest:,}"):
    run_search(config, workdir)


def test_workdir_without_checkpoint_or_config(tmp_path, workdir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_supernet(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    load_supernet(str(empty))
  shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    load_supernet(str(empty))


def test_checkpoint_of_another_model_is_named(tmp_path, workdir):
  other = tmp_path / "other"
  shutil.copytree(workdir, other, ignore=shutil.ignore_patterns("search"))
  config = json.load(open(other / "config.json"))
  config["model"], config["model_options"] = "slim_mobilenet_v2_tiny", {"num_classes": 10}
  json.dump(config, open(other / "config.json", "w"))
  with pytest.raises(ValueError, match="does not hold a slim_mobilenet_v2_tiny"):
    load_supernet(str(other))
