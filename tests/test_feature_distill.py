"""Feature distillation for classifiers (ofajax.feature_distill through ofajax.train): the layer
checks, the loss, and prune -> fine-tune with features from the unpruned teacher, resumed.

The teacher is a DigitsCNN (tests/user_models.py) trained 4 steps; prune.py halves its channels
and the pruned network is fine-tuned from its weights, matching the teacher's BatchNorm_0 and
Dense_0 outputs through adapters.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ofajax
from ofajax import feature_distill, prune
from ofajax import train as training
from ofajax.workdir import DistillState
from conftest import tiny_config
from test_prune import SHAPE, WideCNN
from user_models import DigitsCNN

# What --config.distill_features=BatchNorm_0,Dense_0 overrides the default () with.
LAYERS = ("BatchNorm_0,Dense_0",)
STEPS, STOP = 12, 6


def digits_config(data_dir, steps: int, **overrides):
  """An elasticized DigitsCNN at one width, one subnet a step, ``steps`` steps."""
  c = tiny_config(data_dir, **{"model": "elasticize", "num_epochs": steps / 38,
                               "log_every_steps": 2, "distill": "none", **overrides})
  c.model_options = ml_collections.ConfigDict({"factory": "user_models:digits_cnn",
                                               "factory_options": {"weights": ""},
                                               "widths": (1.0,), "kernels": False})
  c.phases[0].num_subnets, c.phases[0].sampling = 1, "random"   # one arch: one subnet
  return c


def train(config, workdir):
  run = training.setup(config, workdir)
  training.train_loop(run)
  return run


def metric(workdir, key):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r[key] for r in map(json.loads, f) if key in r]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("feature_distill")
  teacher, pruned, student = (str(root / k) for k in ("teacher", "pruned", "student"))
  train(digits_config(data_dir, 4), teacher)
  info = prune.prune_workdir(teacher, pruned, keep=0.5)
  c = digits_config(data_dir, STEPS, distill="teacher", teacher_workdir=teacher,
                    distill_features=LAYERS, stop_after_steps=STOP)
  c.model_options.factory_options.weights = os.path.join(pruned, prune.VARIABLES_FILE)
  first = train(c, student)
  c.stop_after_steps = 0
  second = training.setup(c, student)   # resumes from step STOP
  resumed = jax.device_get(second.state)   # the step donates the state it is given
  training.train_loop(second)
  return {"teacher": teacher, "student": student, "info": info, "first": first,
          "resumed": resumed, "second": second}


def test_an_unknown_layer_lists_the_valid_names():
  module, sample = DigitsCNN(), jnp.zeros((1, 8, 8, 1))
  supernet, space, variables = ofajax.elasticize(module, sample)
  with pytest.raises(ValueError, match=r"\['nope'\] .* valid names: \['BatchNorm_0', "
                                       r"'BatchNorm_1', 'Conv_0', 'Conv_1', 'Dense_0', 'Dense_1'\]"):
    feature_distill.feature_shapes(supernet, variables, sample, space.largest(), ("nope",))
  assert feature_distill.parse_names(("Conv_0,Dense_0",)) == ("Conv_0", "Dense_0")


def test_a_layer_some_subnets_skip_is_refused():
  x = jnp.zeros(SHAPE)
  supernet, space, variables = ofajax.elasticize(WideCNN(), x, skippable=("block",))
  with pytest.raises(ValueError, match="'block/bn1' is in the skippable block 'block'"):
    feature_distill.feature_shapes(supernet, variables, x, space.largest(), ("block/bn1",))
  assert feature_distill.feature_shapes(supernet, variables, x, space.largest(),
                                        ("stem_bn",)) == {"stem_bn": SHAPE[:3] + (6,)}


def test_features_need_a_teacher(data_dir):
  config = digits_config(data_dir, 4, distill_features=LAYERS)   # distill="none"
  with pytest.raises(ValueError, match="set config.distill='teacher' and config.teacher_workdir"):
    training.check_config(config)


def test_the_feature_loss_is_zero_only_when_the_student_matches():
  module, sample = DigitsCNN(), jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 1)),
                                            jnp.float32)
  supernet, space, variables = ofajax.elasticize(module, sample)
  names, arch = ("Conv_1", "Dense_0"), space.largest()
  features = jax.jit(lambda v: feature_distill.apply_with_features(supernet, v, sample, arch,
                                                                   names)[1])
  teacher = features(variables)
  identity = {n: {"kernel": jnp.eye(f.shape[-1]), "bias": jnp.zeros(f.shape[-1])}
              for n, f in teacher.items()}
  assert float(feature_distill.feature_loss(identity, teacher, teacher)) == 0.0
  other = jax.tree.map(lambda v: v * 1.1, variables)
  student = features(other)
  assert float(feature_distill.feature_loss(identity, student, teacher)) > 1e-4


def test_runs_without_features_keep_the_old_checkpoint_layout(finetuned):
  directory = os.path.join(finetuned["teacher"], "checkpoints", "4", "state")
  stored = ocp.StandardCheckpointer().metadata(directory).item_metadata
  assert set(stored) == {"step", "params", "batch_stats", "opt_state", "rng"}


def test_pruned_student_learns_the_teachers_features(finetuned):
  assert finetuned["info"].macs_after < 0.5 * finetuned["info"].macs_before
  feature = metric(finetuned["student"], "feature")
  assert len(feature) == STEPS // 2 and min(feature) > 0
  assert feature[-1] < 0.7 * feature[0], feature
  adapters = finetuned["second"].state.adapters
  assert adapters["BatchNorm_0"]["kernel"].shape == (8, 16)   # pruned 8 -> the teacher's 16
  assert adapters["Dense_0"]["kernel"].shape == (16, 32)


def test_a_resumed_run_restores_the_adapters(finetuned):
  saved, resumed = finetuned["first"].state, finetuned["resumed"]
  assert isinstance(resumed, DistillState) and int(resumed.step) == STOP
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.adapters), resumed.adapters)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.adapter_opt_state),
               resumed.adapter_opt_state)
  # and they kept training after the resume
  assert not np.array_equal(resumed.adapters["Dense_0"]["kernel"],
                            finetuned["second"].state.adapters["Dense_0"]["kernel"])
