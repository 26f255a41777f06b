"""The workdir contract: config.json -> model options, TrainState checkpoints, load_supernet."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ofajax import models, workdir


def _config(**options) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "ofa_mbv3_tiny"
  c.model_options = ml_collections.ConfigDict(
      {"num_classes": 10, "depth_choices": (1, 2), "kernel_choices": (3, 5), **options})
  c.resolution = 8
  return c


def test_model_options_survive_json_and_give_a_hashable_model(tmp_path):
  config = _config()
  workdir.write_config(str(tmp_path), config)
  read = workdir.read_config(str(tmp_path))
  assert isinstance(read.model_options.depth_choices, list)  # what JSON gives back
  assert workdir.model_options(read) == workdir.model_options(config)
  model, _ = workdir.build_model(read)
  # Modules are jit static arguments (calibrate_bn, the engine): they must hash, and equal
  # options must give equal models whichever way the config came in.
  assert hash(model) == hash(workdir.build_model(config)[0])
  assert model == workdir.build_model(config)[0]


def test_read_config_names_what_is_wrong(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    workdir.read_config(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="not a training workdir"):
    workdir.read_config(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    workdir.read_config(str(tmp_path))


def _save(path: str, config, variables, step: int) -> None:
  tx = optax.sgd(0.1)
  state = workdir.new_state(variables, tx.init(variables["params"]), jax.random.key(0), step)
  workdir.write_config(path, config)
  ckpt = workdir.Checkpoints(path)
  ckpt.save(step, state, {"step": step})
  ckpt.close()


def test_train_state_round_trip_and_load_supernet(tmp_path):
  config = _config()
  model, space = workdir.build_model(config)
  sample = models.sample_input(model, 8)
  variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype),
                           jax.eval_shape(model.init, jax.random.key(0), sample, space.largest()))
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  _save(str(tmp_path / "run"), config, variables, 7)

  target, _ = workdir.abstract_state(model, lambda p: optax.sgd(0.1), sample)
  state, meta = workdir.Checkpoints(str(tmp_path / "run")).restore(target)
  assert isinstance(state, workdir.TrainState) and int(state.step) == 7 and meta == {"step": 7}
  jax.tree.map(np.testing.assert_array_equal, state.variables, variables)

  loaded = workdir.load_supernet(str(tmp_path / "run"))
  assert loaded.step == 7 and loaded.model == model
  jax.tree.map(np.testing.assert_array_equal, loaded.variables, variables)


def test_load_supernet_refuses_a_checkpoint_of_another_model(tmp_path):
  config = _config()
  model, space = workdir.build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), models.sample_input(model, 8),
                          space.largest())
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes))
  _save(str(tmp_path / "run"), config, variables, 1)
  # The config now claims a wider model than the checkpoint holds.
  with open(tmp_path / "run" / "config.json") as f:
    claimed = json.load(f)
  claimed["model_options"]["expand_choices"] = [3, 4, 8]
  with open(tmp_path / "run" / "config.json", "w") as f:
    json.dump(claimed, f)
  with pytest.raises(ValueError, match="does not hold a ofa_mbv3_tiny"):
    workdir.load_supernet(str(tmp_path / "run"))
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 5"):
    workdir.load_supernet(str(tmp_path / "run"), step=5)
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "1")  # nothing was removed
