"""The GAN job ``train.py`` runs for ``config.task = "gan"``: a (supernet) generator against a
PatchGAN discriminator on the paired edges -> digit task, then every named subnet judged.

It shares the classifier job's loop (``ofajax.train.train_loop``): the same workdir layout,
checkpoints every ``checkpoint_every_steps``, resume from the latest, SIGTERM saves and stops,
a non-finite loss stops without saving, metrics to TensorBoard. The generator's ``params`` and
``batch_stats`` sit where a classifier's do in the checkpoint, so ``ofajax.workdir.load_supernet``
(search, export, ``init_workdir``, a teacher) reads a GAN workdir's generator unchanged.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import optax

from ofajax import distributed, feature_distill, models, optimizer, starting_weights
from ofajax import train as train_lib
from ofajax import workdir as workdir_lib
from ofajax.gan import data as gan_data
from ofajax.gan import evaluate
from ofajax.gan import judge as gan_judge
from ofajax.gan.step import GanLossOptions, GanState, make_gan_step
from ofajax.metrics_writer import MetricsWriter
from ofajax.models.generators import PatchDiscriminator
from ofajax.phases import Phase
from ofajax.workdir import Checkpoints


def check_config(config) -> None:
  if config.distill not in ("teacher", "none"):
    raise ValueError(f"a GAN's config.distill must be 'teacher' (feature distillation from "
                     f"config.teacher_workdir) or 'none', got {config.distill!r}")
  if config.distill == "teacher" and not (config.teacher_workdir and config.gan.distill_layers):
    raise ValueError("config.distill='teacher' needs config.teacher_workdir (a trained GAN "
                     "workdir) and config.gan.distill_layers (module paths of the generator, "
                     "e.g. ['block0', 'block2'])")
  GanLossOptions.from_config(config)


def _adam(config, schedule):
  # pix2pix / GAN Compression: Adam with beta1 = 0.5 for both players.
  adam = optax.adam(schedule, b1=float(config.gan.beta1))
  if config.get("grad_clip_norm"):   # what a non-finite loss's error message suggests
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adam)
  return adam


def load_teacher(config, layers, sample):
  """(edges -> {layer: feature}, {layer: shape}) of the largest arch of the teacher workdir's
  generator, frozen."""
  teacher = workdir_lib.load_supernet(config.teacher_workdir)
  model, variables, largest = teacher.model, teacher.variables, teacher.space.largest()
  shapes = feature_distill.feature_shapes(model, variables, sample, largest, layers)

  def forward(edges):
    return feature_distill.apply_with_features(model, variables, edges, largest, layers,
                                               train=False)[1]
  return forward, shapes


def _fresh_state(model, space, disc, config, g_tx, d_tx, teacher_shapes, sample):
  init_key, disc_key, adapter_key, rng = jax.random.split(jax.random.key(config.seed), 4)
  variables = models.init(model, init_key, sample)
  adapters = {}
  if teacher_shapes:
    student = feature_distill.feature_shapes(model, variables, sample, space.largest(),
                                     tuple(config.gan.distill_layers))
    adapters = feature_distill.init_adapters(adapter_key, student, teacher_shapes)
  disc_params = disc.init(disc_key, sample, jnp.zeros(sample.shape[:-1] + (
      model.num_classes,)))
  state = GanState(step=jnp.int32(0), params=variables["params"],
                   batch_stats=variables["batch_stats"],
                   opt_state=g_tx.init({"generator": variables["params"], "adapters": adapters}),
                   rng=jax.random.key_data(rng), disc_params=disc_params,
                   disc_opt_state=d_tx.init(disc_params), adapters=adapters)
  if config.model == workdir_lib.ELASTICIZE:
    state = starting_weights.init_from_factory(state, model, config, True)
  if config.get("init_workdir"):
    state = starting_weights.init_from_workdir(state, config, True)
  # The optimizer state must describe the starting weights' tree (same shapes: re-init is exact).
  return state.replace(opt_state=g_tx.init({"generator": state.params, "adapters": adapters}))


def _batches(pairs, config, start_step: int, block: int, blocks: int):
  """This process's block of each global batch, as the loop's {"inputs", "label"}: the edge map
  in, the digit the generator must draw as its target."""
  per = config.batch_size // blocks
  for batch in gan_data.train_batches(pairs, config.batch_size, config.seed, start_step):
    rows = slice(block * per, (block + 1) * per)
    yield {"inputs": batch["edges"][rows], "label": batch["digits"][rows]}


def setup(config, workdir: str) -> train_lib.Run:
  """The classifier job's ``Run``, built for a generator and its discriminator."""
  check_config(config)
  is_main = jax.process_index() == 0
  model, space = workdir_lib.build_model(config)
  disc = PatchDiscriminator(**dict(config.gan.discriminator))
  mesh = distributed.make_mesh(config.get("num_devices", 0))
  distributed.check_batch_size(config.batch_size, mesh.shape[distributed.DATA])
  pairs = gan_data.load_pairs(config.train_split, config.data_dir or None, config.dataset)
  steps_per_epoch = max(1, len(pairs.edges) // config.batch_size)
  phases = [Phase(p, i, space, steps_per_epoch) for i, p in enumerate(config.phases)]
  if is_main:
    workdir_lib.write_config(workdir, config)
  schedule = optimizer.make_schedule(phases, config.get("lr_schedule", "linear"))
  g_tx, d_tx = _adam(config, schedule), _adam(config, schedule)
  sample = jnp.zeros((1,) + pairs.edges.shape[1:], jnp.float32)
  teacher, teacher_shapes = None, {}
  if config.distill == "teacher":
    teacher, teacher_shapes = load_teacher(config, tuple(config.gan.distill_layers), sample)
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints)
  state = _fresh_state(model, space, disc, config, g_tx, d_tx, teacher_shapes, sample)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(workdir_lib.abstract_like(state, distributed.replicated(mesh)))
    if is_main:
      print(f"resumed from {ckpt.directory} at step {int(state.step)}")
  else:
    state = distributed.replicate(state, mesh)
  step = make_gan_step(model, space, disc, config, g_tx, d_tx,
                       max(p.num_subnets for p in phases), teacher, mesh)
  block, blocks = distributed.process_block(mesh, config.batch_size)
  batches = _batches(pairs, config, int(state.step), block, blocks)
  return train_lib.Run(config, workdir, model, space, phases, mesh, schedule, g_tx, state, step,
                       batches, ckpt, is_main)


def final_evaluation(run: train_lib.Run) -> list[dict]:
  """The largest, the smallest and random subnets judged on the test split; eval.json."""
  config, space = run.config, run.space
  named = [("largest", space.largest())]
  if space.name(space.smallest()) != space.name(space.largest()):  # one-width stages: one net
    named.append(("smallest", space.smallest()))
  keys = jax.random.split(jax.random.key(config.seed + 2), config.eval.num_random_subnets)
  named += [(space.name(a), a) for a in (space.sample(k) for k in keys)]
  data_dir = config.data_dir or None
  train_pairs = gan_data.load_pairs(config.train_split, data_dir, config.dataset)
  calib = evaluate.calibration_edges(train_pairs, config.eval.calib_batch_size,
                                     config.eval.calib_batches, config.seed + 1)
  test_pairs = gan_data.load_pairs(config.test_split, data_dir, config.dataset)
  variables = jax.device_get(run.state.variables)
  records = evaluate.score(run.model, variables, named, test_pairs, calib,
                           gan_judge.get_judge(data_dir, gan_judge.settings_with(
                               config.gan.get("judge"))), config.resolution)
  if run.is_main:
    with open(os.path.join(run.workdir, "eval.json"), "w") as f:
      json.dump(records, f, indent=1)
    with MetricsWriter(run.workdir, enabled=True) as writer:
      writer.write_records(int(run.state.step), "eval", [
          {k: r[k] for k in ("name", "macs", "params", "frechet", "accuracy")} for r in records])
    print(evaluate.format_records(records))
  return records


def train_and_evaluate(config, workdir: str) -> list[dict]:
  """Trains the GAN of ``config`` in ``workdir`` (resuming if it holds checkpoints), then judges
  its generator's subnets; returns the eval records ([] when stopped early)."""
  run = setup(config, workdir)
  if not train_lib.train_loop(run):
    return []
  return final_evaluation(run)


__all__ = ["check_config", "final_evaluation", "load_teacher", "setup", "train_and_evaluate"]
