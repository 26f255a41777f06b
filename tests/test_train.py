"""Supernet training end to end on tiny settings (digits, 8x8), restarts, phases, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from conftest import tiny_config, trained_config
from ofajax import data, evaluation, losses, models, starting_weights
from ofajax import optimizer, train_step
from ofajax import train as training
from ofajax.workdir import Checkpoints, abstract_like, build_model, init_state, load_supernet
from ofajax.phases import Phase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _restore_params(workdir, config):
  model, space = models.get(config.model, **dict(config.model_options))
  sample = jnp.zeros((1, config.resolution, config.resolution, 1))
  state, _ = init_state(model, config.seed, lambda p: optimizer.make_optimizer(
      config, optimizer.make_schedule([Phase(config.phases[0], 0, space, 44)]), p), sample)
  restored, _ = Checkpoints(workdir).restore(abstract_like(state))
  return restored


def test_train_and_evaluate_end_to_end_and_exact_resume(tmp_path, data_dir, trained_workdir):
  full, records = trained_workdir  # trained_config run to its end (60 steps), evaluated
  config = trained_config(data_dir)
  names = [r["name"] for r in records]
  assert names[:2] == ["largest", "smallest"] and len(records) == 4
  for r in records:
    assert set(r) == {"name", "arch", "macs", "params", "top1"}
    assert r["top1"] >= 0.2, r  # it learned: twice chance on 10 classes after 60 steps
  by_name = {r["name"]: r for r in records}
  assert by_name["largest"]["top1"] >= 0.3  # measured 0.52 (smallest 0.43) on 2 CPU cores
  assert by_name["largest"]["macs"] > by_name["smallest"]["macs"]
  assert json.load(open(os.path.join(full, "eval.json"))) == records
  lines = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
  assert [l["step"] for l in lines if "loss" in l] == list(range(4, 61, 4))
  assert all(np.isfinite(l["loss"]) for l in lines if "loss" in l)
  assert os.path.getsize(os.path.join(full, "accuracy_vs_macs.png")) > 1000
  assert json.load(open(os.path.join(full, "config.json")))["model"] == "ofa_mbv3_tiny"

  # Interrupted after step 6 (a checkpoint is written there), then resumed: bitwise equal.
  parted = str(tmp_path / "parted")
  assert training.train_and_evaluate(trained_config(data_dir, stop_after_steps=6), parted) == []
  assert Checkpoints(parted).latest_step() == 6
  assert training.train_loop(training.setup(config, parted))  # the rest; no second evaluation
  a, b = _restore_params(full, config), _restore_params(parted, config)
  assert int(a.step) == int(b.step) == 60
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)

  # OFA-style: random subnets distilled from an external teacher (the run above, frozen).
  student = trained_config(data_dir, distill="teacher", teacher_workdir=full, stop_after_steps=4)
  student.phases[0].sampling = "random"
  training.train_and_evaluate(student, str(tmp_path / "student"))
  lines = [json.loads(l) for l in open(str(tmp_path / "student" / "metrics.jsonl"))]
  assert lines[-1]["step"] == 4 and np.isfinite(lines[-1]["loss"])


def test_one_compile_across_three_phases_and_20_steps():
  config = default.get_config()
  config.model = "ofa_mbv3_tiny"
  # two elastic stages of two blocks (SE in the second): active execution compiles in seconds
  config.model_options = ml_collections.ConfigDict({
      "num_classes": 10, "base_widths": (8, 8, 16, 24, 48, 64), "strides": (1, 2, 2),
      "acts": ("relu", "relu", "h_swish"), "use_se": (False, False, True),
      "depth_choices": (1, 2), "kernel_choices": (3, 5), "expand_choices": (3, 6)})
  model, space = build_model(config)
  assert model.execution == "active"  # the default ("auto") for this model: switches inside
  phase_cfgs = [dict(name="kernel", epochs=1, learning_rate=0.1, num_subnets=2,
                     sampling="random", restrict={"depth": [2], "expand": [6]}),
                dict(name="depth", epochs=1, learning_rate=0.05, num_subnets=3,
                     sampling="random", restrict={"expand": [6]}),
                dict(name="expand", epochs=1, learning_rate=0.02, num_subnets=4,
                     sampling="sandwich", restrict={})]
  phases = [Phase(ml_collections.ConfigDict(p), i, space, 7)
            for i, p in enumerate(phase_cfgs)]
  config.distill = "none"
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  y = jnp.arange(8) % 10
  schedule = optimizer.make_schedule(phases)
  state, tx = init_state(model, config.seed, lambda p: optimizer.make_optimizer(
      config, schedule, p), x[:1])
  step = train_step.make_train_step(model, space, config, tx, max_subnets=4)
  losses_seen = []
  for i in range(20):
    phase = phases[min(i // 7, 2)]
    state, metrics = step(state, x, y, phase.as_data(), resolution=8)
    losses_seen.append(float(metrics["loss"]))
  assert step._cache_size() == 1
  assert all(np.isfinite(losses_seen)) and int(state.step) == 20
  # resolution is the only static input: another size is one more compile (images resized)
  state, metrics = step(state, x, y, phases[2].as_data(), resolution=6)
  assert step._cache_size() == 2 and np.isfinite(float(metrics["loss"]))


def test_teacher_bn_statistics_are_calibrated_as_evaluation_calibrates(data_dir, trained_workdir):
  """A sandwich-trained supernet's stored BN statistics average every sampled subnet; the
  teacher is its largest network as evaluation scores it: calibrated on the same batches."""
  config = trained_config(data_dir)
  teacher = load_supernet(trained_workdir[0])
  calibrated = starting_weights.calibrated_teacher(teacher, config)["batch_stats"]
  evaluator = evaluation.make_evaluator(
      teacher.model, teacher.variables, dataset=config.dataset, data_dir=data_dir,
      resolution=config.resolution, calib_split=config.train_split,
      calib_batch_size=config.eval.calib_batch_size, calib_batches=config.eval.calib_batches,
      seed=config.seed + 1, split=config.test_split, batch_size=config.eval.batch_size,
      chunk_size=1, archs_per_call=1)
  expected = evaluator.calibrated_variables(teacher.space.largest())["batch_stats"]
  for got, want in zip(jax.tree.leaves(calibrated), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  moved = [float(jnp.max(jnp.abs(g - s))) for g, s in
           zip(jax.tree.leaves(calibrated), jax.tree.leaves(teacher.variables["batch_stats"]))]
  assert max(moved) > 1e-2   # the stored averages are not the largest network's statistics


def test_inplace_distillation_does_not_flow_into_the_teacher():
  student = jax.random.normal(jax.random.key(0), (4, 10))
  teacher = jax.random.normal(jax.random.key(1), (4, 10))
  g_teacher = jax.grad(lambda t: losses.distillation(student, t, 2.0))(teacher)
  g_student = jax.grad(lambda s: losses.distillation(s, teacher, 2.0))(student)
  assert np.all(np.asarray(g_teacher) == 0.0) and np.any(np.asarray(g_student) != 0.0)
  # and distilling to yourself is a minimum: zero gradient
  g_self = jax.grad(lambda s: losses.distillation(s, jax.lax.stop_gradient(s)) )(student)
  np.testing.assert_allclose(g_self, 0.0, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
  workdir = str(tmp_path / "nan")
  # The shared run's config: its compiled step is a cache hit (a huge learning rate would be
  # another program to compile), so the loss is made NaN through the data.
  training.train_and_evaluate(trained_config(data_dir, stop_after_steps=4), workdir)
  assert Checkpoints(workdir).latest_step() == 4
  batches = data.make_train_iterator

  def poisoned(*args, **kwargs):
    for batch in batches(*args, **kwargs):
      yield {**batch, "inputs": np.full_like(batch["inputs"], np.nan)}

  monkeypatch.setattr(data, "make_train_iterator", poisoned)
  with pytest.raises(FloatingPointError, match="at step 8 .*last good checkpoint is step 4"):
    training.train_and_evaluate(trained_config(data_dir), workdir)
  assert Checkpoints(workdir).latest_step() == 4


def test_corrupt_checkpoint_gives_clear_error_and_keeps_older_ones(tmp_path, data_dir,
                                                                   trained_workdir):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(trained_workdir[0], workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir), key=int)[-2:] == ["40", "60"]
  for root, _, files in os.walk(os.path.join(ckpt_dir, "60", "state")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(ValueError, match="could not be read.*left untouched"):
    training.train_and_evaluate(trained_config(data_dir), workdir)
  assert os.path.isdir(os.path.join(ckpt_dir, "40")) and os.path.isdir(os.path.join(ckpt_dir, "60"))


def test_missing_dataset_says_how_to_prepare(tmp_path):
  config = tiny_config(str(tmp_path / "empty"), dataset="cifar10")
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    training.train_and_evaluate(config, str(tmp_path / "w"))


def test_unknown_config_key_lists_close_matches(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/default.py", "--workdir",
       str(tmp_path / "w"), "--config.learning_rat=0.1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'Did you mean "learning_rate"' in result.stderr


def test_bad_config_values_are_rejected(tmp_path, data_dir):
  with pytest.raises(ValueError, match="distill must be"):
    training.train_and_evaluate(tiny_config(data_dir, distill="self"), str(tmp_path / "a"))
  config = tiny_config(data_dir)
  config.phases[0].sampling = "random"
  with pytest.raises(ValueError, match="needs sampling='sandwich'"):
    training.train_and_evaluate(config, str(tmp_path / "b"))


@pytest.mark.parametrize("name,arg", [
    ("default", None), ("ofa_mbv3_imagenet", None), ("ofa_mbv3_imagenet", "teacher"),
    ("compofa_mbv3_imagenet", None), ("us_mobilenet_v2_imagenet", None),
    ("autoslim_mobilenet_v2_imagenet", None), ("ofa_mbv3_cifar10", None),
    ("compofa_mbv3_cifar10", None), ("us_mobilenet_v2_cifar10", None),
    ("autoslim_mobilenet_v2_cifar10", None)])
def test_every_config_builds_its_model_and_phases(name, arg):
  import importlib
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(arg) if arg else module.get_config()
  model, space = models.get(config.model, **dict(config.model_options))
  phases = [Phase(p, i, space, 100) for i, p in enumerate(config.phases)]
  assert phases and all(p.steps > 0 and p.learning_rate > 0 for p in phases)
  assert config.dataset in data.DATASETS
  if name.startswith("ofa_mbv3") and arg is None:  # OFA: K357 -> D34 -> D234 -> E46 -> E346
    assert [p.num_subnets for p in phases] == [1, 2, 2, 4, 4]
    assert phases[-1].space.cardinality() == space.cardinality()
  if name.startswith("us_"):
    assert phases[0].num_subnets == 4 and config.distill == "inplace"
