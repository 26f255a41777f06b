"""GAN compression end to end, tiny: every stage's config through the real job, in order.

Stage 1 (MobileResNet trained directly, resumed halfway), L1 pruning, stage 2 (pruned +
feature distillation from stage 1), stage 3 (a supernet over the pruned channels, distilled
from stage 2) and the generator search with its StableHLO export. Each stage's losses must
fall and its generator must beat an untrained one on the judge.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gan_mobile, gan_pruned, gan_resnet, gan_supernet
from configs.search import gan as gan_search_config
from ofajax import export, feature_distill, models, prune
from ofajax.gan import data as gan_data
from ofajax.gan import evaluate, step
from ofajax.gan import judge as gan_judge
from ofajax.gan.search import run_gan_search
from ofajax.gan.train import train_and_evaluate
from ofajax.workdir import load_supernet
from conftest import TEST_JUDGE

STEPS = 24


def tiny(get_config, data_dir: str, **overrides):
  """A stage's config at test size: ngf 4, two blocks, batch 16, 24 steps."""
  c = get_config()
  c.model_options.factory_options.ngf = 4
  c.model_options.factory_options.n_blocks = 2
  c.data_dir, c.batch_size = data_dir, 16
  c.num_epochs = STEPS / (3500 // 16)
  c.learning_rate = 1e-3
  c.log_every_steps = c.checkpoint_every_steps = 6
  c.eval.calib_batches, c.eval.calib_batch_size = 1, 64
  c.gan.judge = TEST_JUDGE
  if c.distill == "teacher":
    c.gan.distill_layers = ("block1", "up1")
  for k, v in overrides.items():
    c[k] = v
  return c


def losses(workdir: str, key: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r[key] for r in map(json.loads, f) if key in r]


def untrained_frechet(workdir: str, data_dir: str) -> float:
  """The judge's Fréchet distance for the workdir's generator at a fresh initialisation."""
  sup = load_supernet(workdir)
  fresh = models.init(sup.model, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  test = gan_data.load_pairs("test", data_dir)
  judge = gan_judge.get_judge(data_dir, gan_judge.settings_with(TEST_JUDGE))
  [record] = evaluate.score(sup.model, fresh, [("untrained", sup.space.largest())], test, None,
                            judge, 28)
  return record["frechet"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory, mnist_dir):
  root = tmp_path_factory.mktemp("gan")
  out = {k: str(root / k) for k in ("mobile", "pruned_weights", "pruned", "supernet")}
  # Stage 1 stops halfway (a checkpoint) and resumes, as a preempted run would.
  assert train_and_evaluate(tiny(gan_mobile.get_config, mnist_dir,
                                 stop_after_steps=STEPS // 2), out["mobile"]) == []
  out["mobile_eval"] = train_and_evaluate(tiny(gan_mobile.get_config, mnist_dir), out["mobile"])
  out["pruned_info"] = prune.prune_workdir(out["mobile"], out["pruned_weights"], keep=0.5)
  weights = os.path.join(out["pruned_weights"], "pruned.msgpack")
  c = tiny(gan_pruned.get_config, mnist_dir, teacher_workdir=out["mobile"])
  c.model_options.factory_options.weights = weights
  out["pruned_eval"] = train_and_evaluate(c, out["pruned"])
  c = tiny(gan_supernet.get_config, mnist_dir, teacher_workdir=out["pruned"],
           init_workdir=out["pruned"])
  c.model_options.factory_options.weights = weights
  c.eval.num_random_subnets = 1
  out["supernet_eval"] = train_and_evaluate(c, out["supernet"])
  return out


def test_stage1_resumes_learns_and_beats_an_untrained_generator(stages, mnist_dir):
  l1 = losses(stages["mobile"], "l1")
  assert len(l1) == STEPS // 6 and l1[-1] < 0.8 * l1[0]
  [largest] = stages["mobile_eval"]
  assert largest["frechet"] < 0.8 * untrained_frechet(stages["mobile"], mnist_dir)


def test_a_resumed_run_equals_an_uninterrupted_one(stages, mnist_dir, tmp_path):
  train_and_evaluate(tiny(gan_mobile.get_config, mnist_dir), str(tmp_path))
  resumed = load_supernet(stages["mobile"]).variables
  straight = load_supernet(str(tmp_path)).variables
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_pruning_halves_and_distillation_pulls_features_to_the_teacher(stages, mnist_dir):
  info = stages["pruned_info"]
  assert info.macs_after < 0.5 * info.macs_before
  feature = losses(stages["pruned"], "feature")
  assert feature[-1] < 0.8 * feature[0] and min(feature) > 0
  [largest] = stages["pruned_eval"]
  assert largest["macs"] == info.macs_after
  assert largest["frechet"] < 0.8 * untrained_frechet(stages["pruned"], mnist_dir)


def test_supernet_trains_subnets_and_search_exports_them(stages, mnist_dir):
  records = {r["name"]: r for r in stages["supernet_eval"]}
  assert records["smallest"]["macs"] < 0.5 * records["largest"]["macs"]
  assert losses(stages["supernet"], "l1")[-1] < losses(stages["supernet"], "l1")[0]
  config = gan_search_config.get_config()
  config.target_fractions = (0.85,)
  config.calib_batches, config.calib_batch_size = 1, 64
  result = run_gan_search(config, stages["supernet"])
  [row] = result["chosen"]
  assert row["macs"] <= 0.85 * records["largest"]["macs"]
  path = os.path.join(stages["supernet"], "search", "gan", "subnets",
                      f"macs_{int(row['target_macs'])}", "model.stablehlo")
  generate = export.load_stablehlo(path)
  sup = load_supernet(stages["supernet"])
  arch = sup.space.validate(row["arch"])
  test = gan_data.load_pairs("test", mnist_dir)
  calib = evaluate.calibration_edges(gan_data.load_pairs("train[:-500]", mnist_dir), 64, 1, 0)
  expected = evaluate.make_generate(sup.model, sup.variables, arch, calib)(test.edges[:8])
  np.testing.assert_allclose(np.asarray(generate(test.edges[:8])), expected, atol=1e-4)


def test_an_unknown_feature_layer_lists_the_valid_names(stages):
  sup = load_supernet(stages["mobile"])
  with pytest.raises(ValueError, match=r"\['block0', .*'up1'"):
    feature_distill.feature_shapes(sup.model, sup.variables, jnp.zeros((1, 28, 28, 1)),
                           sup.space.largest(), ("block9",))


def test_the_original_resnet_generator_stage_learns(mnist_dir, tmp_path):
  config = tiny(gan_resnet.get_config, mnist_dir)
  config.model_options.factory_options.n_blocks = 1
  [largest] = train_and_evaluate(config, str(tmp_path))
  l1 = losses(str(tmp_path), "l1")
  assert l1[-1] < 0.8 * l1[0]
  assert largest["frechet"] < 0.8 * untrained_frechet(str(tmp_path), mnist_dir)


# (D loss at its optimum, D loss with real and fake both at 2, G loss with the fake at -2)
GAN_LOSS_VALUES = {"lsgan": ((1.0, 0.0), 0.5 * (1 + 4), 9.0),
                   "hinge": ((1.0, -1.0), 3.0, 2.0)}


@pytest.mark.parametrize("kind", sorted(GAN_LOSS_VALUES))
def test_gan_losses_reward_the_right_player(kind):
  (real_target, fake_target), both_at_two, generator_at_minus_two = GAN_LOSS_VALUES[kind]
  ones = jnp.ones(3)
  assert float(step.discriminator_loss(kind, real_target * ones, fake_target * ones)) == 0.0
  assert float(step.discriminator_loss(kind, 2 * ones, 2 * ones)) == pytest.approx(both_at_two)
  assert float(step.generator_adversarial_loss(kind, -2 * ones)) == pytest.approx(
      generator_at_minus_two)
  # Fooling the discriminator lowers the generator's loss.
  assert step.generator_adversarial_loss(kind, 2 * ones) < step.generator_adversarial_loss(
      kind, -2 * ones)
