"""Search on a tiny trained supernet (digits 8x8): greedy, evolution, predictor, latency, export,
bad input; evolution and greedy on synthetic fitness; the resolution gene; validation splits
training never saw."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.search import autoslim, evolution as evolution_config
from ofajax import cost, evaluation, export, models
from ofajax.search import evolution, moves, pareto
from ofajax.data.splits import SplitRange, check_disjoint, holdout_split, resolve_split
from ofajax.search.greedy import greedy_search
from ofajax.search.latency import LatencyTable
from ofajax.search.latency_model import LatencyModel
from ofajax.search.predictor import fit_and_report, kendall_tau
from ofajax.search.run import no_cheaper_better, run_search, scoring_splits, search_evaluator
from ofajax.workdir import load_supernet, write_config
from conftest import rel_err, tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, trained_workdir):
  """A copy of the session's trained tiny supernet (60 steps on train[:-360]): search validates
  on the 360 images it held out (its default)."""
  path = os.path.join(str(tmp_path_factory.mktemp("search")), "workdir")
  shutil.copytree(trained_workdir[0], path)
  return path


def search_config(base, **overrides):
  c = base.get_config()
  # Calibration on the training split, validation on the held-out train[-360:]: the defaults
  # (""). 360 validation images in 3 batches of 120: the test split has the same shape, so the
  # engine's one compiled function also reports test top-1.
  c.calib_batches, c.calib_batch_size = 1, 32
  c.valid_batch_size = 120
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
  assert first["valid_split"] == "train[-360:]" and first["calib_split"] == "train[:-360]"
  for run in first["evolution"]:
    assert len(run["history"]) == 4  # the initial population and 3 generations
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


def test_latency_search_builds_the_model_bounds_greedy_and_retimes(workdir):
  """A latency model built on this device (few archs: a smoke run of the real timing), then
  reused from its file under a bound the MACs target alone does not meet; the chosen subnets
  are re-timed whole."""
  config = search_config(autoslim, target_fractions=(0.9,), export=False, report_test=False)
  config.latency.update(enabled=True, serving_batch_size=0, num_fit_archs=3, num_check_archs=1,
                        warmup=1, seconds=0.02, rounds=2)
  first = run_search(config, workdir)
  report = first["latency"]
  assert set(report["batches"]) == {"1"} and report["fit_archs"] == 3
  assert [c["measured_ms"] > 0 for c in report["batches"]["1"]["checks"]] == [True]
  row = first["chosen"][0]
  assert row["latency"]["1"]["predicted_ms"] == row["latency_ms"]
  assert row["measured_latency_ms"] == row["latency"]["1"]["measured_ms"] > 0
  sup = load_supernet(workdir)
  arch = sup.space.to_host(row["arch"])
  saved = LatencyModel.load(report["file"], sup.model_name, sup.model, 8, (1,))
  assert saved.predict(arch) == row["latency_ms"]
  # Known weights (the timed fit on 3 archs may be nearly flat): latency grows with MACs.
  saved.weights = {1: [0.1, 0.0, 1e-5, 1e-5, 0.0, 0.0]}
  saved.save(str(os.path.join(workdir, "latency_model.json")))
  smallest = saved.predict(sup.space.to_host(sup.space.smallest()))
  bound = (smallest + saved.predict(arch)) / 2
  config.update(max_latency_ms=bound)
  config.latency.table = os.path.join(workdir, "latency_model.json")
  second = run_search(config, workdir)
  assert second["latency"]["loaded"]
  chosen = second["chosen"][0]
  assert chosen["latency_ms"] <= bound < saved.predict(arch)
  assert chosen["macs"] < row["macs"]  # slimming went on past the MACs target
  assert chosen["latency"]["1"]["measured_ms"] > 0


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


# --------------------------------------------------------------------------- evolution, synthetic


def _synthetic(resolution_bonus=None):
  """(space, cost, fitness, target arch): fitness counts the positions equal to a hidden target
  arch, plus ``resolution_bonus[r]``; costs are the real MACs at each candidate's resolution."""
  model, space = models.get("ofa_mbv3_tiny")
  target = space.random_host(np.random.default_rng(123))
  cache = {}

  def cost_fn(arch, resolution):
    k = (moves.arch_key(arch), resolution)
    if k not in cache:
      cache[k] = cost.count(model, arch, resolution or 28, check=False)
    return dict(cache[k])

  def fitness(archs, resolutions):
    bonus = resolution_bonus or {}
    return [sum(int(np.sum(a[k] == target[k])) for k in a) + bonus.get(r, 0)
            for a, r in zip(archs, resolutions)]

  return model, space, cost_fn, fitness


def test_evolution_improves_fitness_with_elitism():
  _, space, cost_fn, fitness = _synthetic()
  out = evolution.evolve(space, fitness, cost_fn, evolution.Constraints(), population=16,
                         iterations=15, seed=0)
  best = [h["best_fitness"] for h in out["history"]]
  assert [h["iteration"] for h in out["history"]] == list(range(16))
  assert all(b >= a for a, b in zip(best, best[1:])), best  # parents survive
  assert best[-1] >= best[0] + 5, best                      # selection + variation climb
  assert out["history"][-1]["mean_fitness"] > out["history"][0]["mean_fitness"]
  # Children drawn at random (every position mutated): only elitism keeps the best.
  out = evolution.evolve(space, fitness, cost_fn, evolution.Constraints(), population=16,
                         iterations=10, mutation_ratio=1.0, mutation_prob=1.0, seed=1)
  best = [h["best_fitness"] for h in out["history"]]
  assert all(b >= a for a, b in zip(best, best[1:])), best


def test_evolution_generation_is_ofas(monkeypatch):
  """Per generation: parent_ratio * population parents, mutation_ratio * population mutants
  and the rest of population as crossovers (OFA: 25 + 50 + 50 = 125 candidates)."""
  _, space, cost_fn, fitness = _synthetic()
  made = {"mutate": 0, "crossover": 0}
  for name in made:
    real = getattr(moves, name)
    def counted(*args, _real=real, _name=name):
      made[_name] += 1
      return _real(*args)
    monkeypatch.setattr(moves, name, counted)
  out = evolution.evolve(space, fitness, cost_fn, evolution.Constraints(), population=20,
                         iterations=3, parent_ratio=0.25, mutation_ratio=0.5, seed=0)
  assert len(out["population"]) == 5 + 10 + 10
  assert made == {"mutate": 3 * 10, "crossover": 3 * 10}  # unconstrained: nothing redrawn


def test_evolution_respects_the_constraint_on_a_synthetic_fitness():
  model, space, cost_fn, _ = _synthetic()
  smallest = cost_fn(space.to_host(space.smallest()), 28)["macs"]
  largest = cost_fn(space.to_host(space.largest()), 28)["macs"]
  bound = (smallest + largest) / 2
  bigger = lambda archs, rs: [cost_fn(a, r)["macs"] for a, r in zip(archs, rs)]  # wants MACs
  out = evolution.evolve(space, bigger, cost_fn, evolution.Constraints(macs=bound),
                         population=16, iterations=10, seed=0)
  assert all(r["macs"] <= bound for r in out["seen"])
  assert out["best"]["macs"] <= bound
  assert out["history"][-1]["best_fitness"] > out["history"][0]["best_fitness"]
  with pytest.raises(ValueError, match=f"smallest subnet has macs = {smallest:,}"):
    evolution.evolve(space, bigger, cost_fn, evolution.Constraints(macs=smallest - 1),
                     population=4, iterations=1)


def test_resolution_is_a_gene():
  model, space, cost_fn, fitness = _synthetic(resolution_bonus={24: 30})
  resolutions = (20, 24, 28)
  bound = cost_fn(space.to_host(space.largest()), 24)["macs"]  # the largest at 28 breaks it
  out = evolution.evolve(space, fitness, cost_fn, evolution.Constraints(macs=bound),
                         population=16, iterations=8, resolutions=resolutions, seed=0)
  first = out["seen"][:16]
  assert len({r["resolution"] for r in first}) > 1      # drawn, not fixed
  assert {r["resolution"] for r in out["seen"]} <= set(resolutions)
  assert out["best"]["resolution"] == 24                 # the gene evolved to the bonus
  for r in out["seen"]:                                  # cost taken at the candidate's own
    assert r["macs"] == cost.count(model, r["arch"], r["resolution"])["macs"] <= bound
  assert out["history"][-1]["best_resolution"] == 24


def test_resolution_gene_mutation_and_crossover():
  _, space, cost_fn, fitness = _synthetic()
  arch = space.to_host(space.largest())
  genes = lambda rs, prob: evolution._Genes(space, fitness, cost_fn, evolution.Constraints(),
                                            rs, np.random.default_rng(0), 100, prob)
  g = genes((20, 24, 28), 1.0)
  assert {g.mutant({"arch": arch, "resolution": 20}, 0.0)["resolution"]
          for _ in range(60)} == {20, 24, 28}
  g = genes((20, 24, 28), 0.0)
  assert {g.mutant({"arch": arch, "resolution": 20}, 0.0)["resolution"]
          for _ in range(20)} == {20}
  children = {g.crossover({"arch": arch, "resolution": 20}, {"arch": arch, "resolution": 28}
                          )["resolution"] for _ in range(40)}
  assert children == {20, 28}                           # either parent's, never another
  g = genes((28,), 1.0)
  state = g.rng.bit_generator.state
  assert g._resolution() == g._resolution(28) == g._resolution(28, 28) == 28
  assert g.rng.bit_generator.state == state             # one resolution: nothing drawn


def test_predictor_learns_the_resolution():
  _, space = models.get("ofa_mbv3_tiny")
  rng = np.random.default_rng(0)
  archs = [space.random_host(rng) for _ in range(120)]
  rs = [int(r) for r in rng.choice([20, 24, 28], size=120)]
  # the resolution matters most, as it does for OFA's archs (+2-3 points from 128 to 224)
  truth = [0.5 + 0.025 * (r - 20) + 0.005 * float(np.sum(a["depth"])) for a, r in zip(archs, rs)]
  predictor, report = fit_and_report(space, archs, truth, holdout_fraction=0.25,
                                     resolutions=rs, choices=(20, 24, 28))
  assert report["rmse"] < report["constant_baseline_rmse"]
  for arch in archs[:20]:  # the same subnet ranks higher at a higher resolution
    assert list(np.argsort(predictor([arch] * 3, [28, 20, 24]))) == [1, 2, 0]
  same = [archs[0]] * 3
  with pytest.raises(ValueError, match="pass each arch's resolution"):
    predictor(same)


def test_search_with_resolutions_scores_each_at_its_own(workdir):
  config = search_config(evolution_config, target_fractions=(0.8,), export=False,
                         report_test=False, name="resolutions", resolutions=(6, 8))
  config.evolution.update(fitness="measured", population=8, iterations=2,
                          resolution_mutation_prob=0.5)
  result = run_search(config, workdir)
  assert result["resolutions"] == [6, 8]
  assert {r["resolution"] for r in result["evaluated"]} == {6, 8}
  sup = load_supernet(workdir)
  for r in result["evaluated"] + result["chosen"]:
    arch = sup.space.from_json(json.dumps(r["arch"]))
    assert cost.count(sup.model, arch, r["resolution"])["macs"] == r["macs"]
  row = result["chosen"][0]
  assert row["macs"] <= row["target_macs"] and row["resolution"] in (6, 8)


# --------------------------------------------------------------------------- greedy


def test_greedy_takes_the_least_harmful_move():
  """A fake engine whose top-1 falls by a known, distinct weight per position per step down
  its values: every round must take the candidate with the smallest known drop."""
  model, space = models.get("ofa_mbv3_tiny")
  rng = np.random.default_rng(0)
  weights = {leaf.name: rng.uniform(0.001, 0.01, leaf.shape) for leaf in space.leaves}
  steps_down = lambda arch, leaf: np.asarray(
      [[len(leaf.values) - 1 - leaf.values.index(v) for v in row]
       for row in np.atleast_2d(arch[leaf.name])]).reshape(leaf.shape)

  def top1(arch):
    return 1.0 - sum(float(np.sum(weights[leaf.name] * steps_down(arch, leaf)
                                  * space.active(arch, leaf.name))) for leaf in space.leaves)

  evaluate = lambda archs: [{"top1": top1(a), "loss": 1 - top1(a)} for a in archs]
  cost_fn = lambda arch: cost.count(model, arch, 28, check=False)
  target = 0.6 * cost_fn(space.to_host(space.largest()))["macs"]
  out = greedy_search(space, evaluate, cost_fn, [target], granularity="layer")
  path = out["path"]
  assert len(path) > 3 and path[-1]["macs"] <= target
  for before, chosen in zip(path, path[1:]):
    options = [(label, a) for label, a in moves.shrink_moves(space, before["arch"], "layer")
               if cost_fn(a)["macs"] < before["macs"]]
    drops = {label: before["top1"] - top1(a) for label, a in options}
    assert chosen["move"] == min(drops, key=drops.get), (chosen["move"], drops)


# --------------------------------------------------------------------------- validation data


def test_split_arithmetic():
  n = {"train": 4000, "test": 1000}
  assert resolve_split("train", n) == [SplitRange("train", 0, 4000)]
  assert resolve_split("train[:-500]", n) == [SplitRange("train", 0, 3500)]
  assert resolve_split("train[-1000:]", n) == [SplitRange("train", 3000, 4000)]
  assert resolve_split("train[:90%]", n) == [SplitRange("train", 0, 3600)]
  assert resolve_split("train[10:20]", 4000) == [SplitRange("train", 10, 20)]
  assert resolve_split("train[:5]+test[-1:]", n) == [SplitRange("train", 0, 5),
                                                     SplitRange("test", 999, 1000)]
  assert len(resolve_split("train[33%:66%]", n)[0]) == 1320
  assert holdout_split("train[:-500]", 500) == "train[-500:]"
  check_disjoint("train[:-500]", "train[-500:]", n)
  check_disjoint("train[:90%]", "train[90%:]", n)
  check_disjoint("train", "test", n)        # different base splits never overlap
  check_disjoint("train[10:20]", "train[20:30]", n)
  with pytest.raises(ValueError, match=re.escape(
      "valid_split 'train[-1000:]' (train[3000:4000]) overlaps the training run's train_split "
      "'train[:-500]' in 500 examples (train[3000:3500])") + ".*Validate on train\\[-500:\\]"):
    check_disjoint("train[:-500]", "train[-1000:]", n)
  with pytest.raises(ValueError, match=re.escape(
      "Train on train[:-1000] and validate on train[-1000:]")):
    check_disjoint("train", "train[-1000:]", n)
  with pytest.raises(ValueError, match="in 1 examples"):
    check_disjoint("train[:11]", "train[10:20]", n)
  with pytest.raises(ValueError, match="split 'train\\[-5000:\\]'"):
    resolve_split("train[-5000:]", n)


def test_search_refuses_validation_that_training_saw(tmp_path, data_dir):
  """Before any checkpoint is read: only config.json is needed to refuse."""
  train = tiny_config(data_dir, train_split="train", holdout=0)
  workdir = str(tmp_path / "w")
  write_config(workdir, train)
  config = search_config(autoslim, valid_split="train[-360:]")
  with pytest.raises(ValueError, match=re.escape(
      "valid_split 'train[-360:]' (train[1077:1437]) overlaps the training run's train_split "
      "'train' in 360 examples") + ".*Train on train\\[:-360\\] and validate on train\\[-360:\\]"):
    run_search(config, workdir)
  # No valid_split and nothing held out: nothing unseen to default to.
  with pytest.raises(ValueError, match="read all of 'train'"):
    scoring_splits(search_config(autoslim), train)
  held = tiny_config(data_dir, train_split="train[:-300]", holdout=300)
  assert scoring_splits(search_config(autoslim), held) == {"calib": "train[:-300]",
                                                           "valid": "train[-300:]"}
  held.holdout = 0  # no holdout field: the tail training never read
  assert scoring_splits(search_config(autoslim), held)["valid"] == "train[-300:]"
  assert scoring_splits(search_config(autoslim, valid_split="test"), train)["valid"] == "test"


def test_a_search_result_is_never_worse_than_a_cheaper_scored_arch():
  """A budget's subnet gives way to any arch of no more MACs the engine scored better on
  validation, the smallest always among them (within the params bound)."""
  import types  # pylint: disable=g-import-not-at-top
  _, space = models.get("ofa_mbv3_tiny", num_classes=10)
  smallest = space.to_host(space.smallest())
  mid = space.to_host(space.largest())
  mid["depth"] = np.full_like(mid["depth"], 3)
  scored = {}

  def evaluate(archs, resolutions):
    for a, r in zip(archs, resolutions):
      scored[(space.name(a), r)] = dict(arch=space.to_host(a), name=space.name(a), resolution=r,
                                        macs=100, params=10, top1=0.90)

  scorer = types.SimpleNamespace(space=space, resolutions=[8], measured=scored,
                                 evaluate=evaluate)
  scored[("mid", 8)] = dict(arch=mid, name="mid", resolution=8, macs=300, params=99, top1=0.95)
  config = ml_collections.ConfigDict({"max_params": 0, "max_latency_ms": 0.0})
  chosen = [(500.0, dict(arch=space.to_host(space.largest()), resolution=8, macs=400,
                         params=50, top1=0.85)),
            (50.0, dict(arch=smallest, resolution=8, macs=100, params=10, top1=0.90))]
  out = no_cheaper_better(config, scorer, chosen)
  assert out[0][1]["name"] == "mid" and out[0][1]["replaces"]["top1"] == 0.85
  assert "replaces" not in out[1][1]                 # nothing cheaper scores better
  config.max_params = 50                            # "mid" breaks the params bound
  out = no_cheaper_better(config, scorer, chosen)
  assert out[0][1]["name"] == space.name(smallest) and out[0][1]["top1"] == 0.90
