"""Supernet training: sandwich rule, in-place / teacher distillation, progressive shrinking.

``train_and_evaluate(config, workdir)`` is the whole job. This module reads top to bottom in
sections: configuration; the job (setup, phase starts, loop); the final evaluation. The jitted
step (one for every phase: a phase is data, so progressive shrinking never recompiles) is
``ofajax.train_step``, the optimizer and its per-phase schedule ``ofajax.optimizer``. Phases
and the subnets each step samples are ``ofajax.phases``; starting weights, the teacher and what
a phase starts from are ``ofajax.starting_weights``.

Scale-out (``ofajax.distributed``): the step is jitted over a ("data", "model") mesh of every
device of every process, with the state replicated and the global batch split over "data", so
one CPU, 8 GPUs and a TPU pod slice run the same code; each process reads only its block of
each global batch. ``config.compute_dtype="bfloat16"`` computes in bfloat16 with float32
parameters, optimizer state and BatchNorm (``ofajax.precision``). SIGTERM saves a checkpoint at
the next step boundary and returns (``ofajax.preemption``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from ofajax import cost, data, distributed, evaluation, feature_distill, models, precision
from ofajax import reporting
from ofajax import optimizer, starting_weights
from ofajax import train_step as train_step_lib
from ofajax.data import splits
from ofajax.phases import Phase
from ofajax import workdir as workdir_lib
from ofajax.metrics_writer import MetricsWriter
from ofajax.preemption import PreemptionGuard
from ofajax.progress import ProgressBar
from ofajax.workdir import Checkpoints, TrainState

# --------------------------------------------------------------------------- configuration


def check_config(config) -> None:
  if config.distill not in ("inplace", "teacher", "none"):
    raise ValueError(f"config.distill must be 'inplace', 'teacher' or 'none', got {config.distill!r}")
  if config.distill == "inplace" and any(p.get("sampling", "sandwich") not in ("sandwich", "all")
                                         for p in config.phases):
    raise ValueError("in-place distillation learns from the largest subnet, so every phase "
                     "needs sampling='sandwich' or 'all' (or set config.distill to 'teacher' / "
                     "'none')")
  if config.distill == "teacher" and not config.teacher_workdir:
    raise ValueError("config.distill='teacher' needs config.teacher_workdir: the workdir of a "
                     "trained full network (e.g. the same config with a single largest-arch phase)")
  if config.get("kd_loss", "soft_ce") not in ("soft_ce", "kl"):
    raise ValueError(f"config.kd_loss must be 'soft_ce' or 'kl', got {config.kd_loss!r}")
  if _distils_hidden(config) and config.distill == "none":
    raise ValueError("config.hidden_mse_weight / embedding_mse_weight distil hidden states from a "
                     "teacher: set config.distill to 'inplace' or 'teacher'")
  if _distils_hidden(config) and config.distill == "inplace":
    raise ValueError(
        "hidden-state / embedding distillation needs a fixed teacher: set config.distill="
        "'teacher' and config.teacher_workdir (DynaBERT's setting). In place, the subnets pull "
        "the shared weights toward collapsed hidden states and the largest subnet stops learning.")
  features = feature_distill.parse_names(config.get("distill_features", ()))
  if features and config.distill != "teacher":
    raise ValueError(
        f"config.distill_features {list(features)} distils intermediate features from a separate "
        f"teacher model, but config.distill is {config.distill!r}: set config.distill='teacher' "
        "and config.teacher_workdir (a trained workdir of the model to learn from, e.g. the "
        "unpruned network), or set config.distill_features=() to train without it")
  if features and not config.get("feature_weight", 1.0) > 0:
    raise ValueError(f"config.feature_weight must be positive with config.distill_features, got "
                     f"{config.feature_weight!r}")
  if config.optimizer not in ("sgd", "adamw"):
    raise ValueError(f"config.optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
  precision.compute_dtype(config.get("compute_dtype", "float32"))


def _distils_hidden(config) -> bool:
  """Whether the loss matches hidden states (transformers: DynaBERT's hidden + embedding MSE)."""
  return bool(config.get("hidden_mse_weight", 0.0) or config.get("embedding_mse_weight", 0.0))


# --------------------------------------------------------------------------- the job


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built once by :func:`setup`."""
  config: ml_collections.ConfigDict
  workdir: str
  model: Any
  space: Any
  phases: list[Phase]
  mesh: Any
  schedule: Callable
  tx: Any
  state: TrainState
  train_step: Callable
  batches: Iterator[dict]
  ckpt: Checkpoints
  is_main: bool

  @property
  def total_steps(self) -> int:
    return sum(p.steps for p in self.phases)

  def phase_index(self, step: int) -> int:
    return int(np.searchsorted(np.cumsum([p.steps for p in self.phases]), step, side="right"))

  def phase_start(self, index: int) -> int:
    return sum(p.steps for p in self.phases[:index])


def _feature_shapes(model, config, teacher, names) -> tuple[dict, dict]:
  """({layer: output shape} of the student, of the teacher) for ``config.distill_features``,
  each model's names checked (``ofajax.feature_distill.feature_shapes``), shapes only."""
  sample = models.sample_input(model, config.resolution)
  largest = model.search_space().largest()
  variables = jax.eval_shape(model.init, jax.random.key(0), sample, largest)
  student = feature_distill.feature_shapes(model, variables, sample, largest, names)
  teacher_shapes = {n: f.shape for n, f in jax.eval_shape(teacher, sample)["features"].items()}
  feature_distill.check_pairing(student, teacher_shapes)
  return student, teacher_shapes


def _start_state(model, config, tx_factory, mesh, ckpt, train_source, workdir, is_main,
                 feature_shapes=None):
  """(state, optimizer): restored from the latest checkpoint straight into the replicated
  layout, or initialised on one device (the same values on every process: same seed), given
  its starting weights, then replicated. ``feature_shapes`` (student's, teacher's): the state
  is a ``DistillState`` holding feature distillation's adapters."""
  sample = models.sample_input(model, config.resolution)
  # Seeds +1..+3 are BN calibration, the evaluation's subnets and re-ordering.
  adapter_key = jax.random.key(config.seed + 4)
  if ckpt.latest_step() is not None:
    target, tx = workdir_lib.abstract_state(model, tx_factory, sample,
                                            distributed.replicated(mesh))
    if feature_shapes:
      target = workdir_lib.abstract_like(jax.eval_shape(
          lambda s: workdir_lib.add_adapters(s, feature_distill.init_adapters(
              adapter_key, *feature_shapes), tx_factory), target), distributed.replicated(mesh))
    state, _ = ckpt.restore(target)
    if is_main:
      print(f"resumed from {ckpt.directory} at step {int(state.step)}")
    return state, tx
  state, tx = workdir_lib.init_state(model, config.seed, tx_factory, sample)
  if config.model == workdir_lib.ELASTICIZE:
    state = starting_weights.init_from_factory(state, model, config, is_main)
  if config.get("init_workdir"):
    state = starting_weights.init_from_workdir(state, config, is_main)
  if config.get("reorder", {}).get("enabled", False):
    state = starting_weights.reorder_by_importance(state, model, config, train_source, workdir,
                                                   is_main)
  if feature_shapes:
    state = workdir_lib.add_adapters(
        state, feature_distill.init_adapters(adapter_key, *feature_shapes), tx_factory)
  return distributed.replicate(state, mesh), tx


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Checks the config, writes config.json, builds the mesh, data, state and step."""
  check_config(config)
  is_main = jax.process_index() == 0
  model, space = workdir_lib.build_model(config)
  if config.dataset not in data.DATASETS:
    raise ValueError(f"unknown config.dataset {config.dataset!r}; known: {sorted(data.DATASETS)}")
  mesh = distributed.make_mesh(config.get("num_devices", 0))
  num_shards = mesh.shape[distributed.DATA]
  distributed.check_batch_size(config.batch_size, num_shards)
  train_source = data.load(config.dataset, config.train_split, config.data_dir or None,
                           tokenizer=config.get("tokenizer") or None)
  splits.check_holdout(config.train_split, int(config.get("holdout", 0)), splits.split_sizes(
      config.dataset, [config.train_split], config.data_dir or None))
  steps_per_epoch = max(1, len(train_source) // config.batch_size)
  phases = [Phase(p, i, space, steps_per_epoch) for i, p in enumerate(config.phases)]
  if is_main:
    print(f"{distributed.describe(mesh)}; global batch {config.batch_size} "
          f"({config.batch_size // num_shards} per device), "
          f"compute {config.get('compute_dtype', 'float32')}")
    workdir_lib.write_config(workdir, config)
  schedule = optimizer.make_schedule(phases, config.get("lr_schedule", "cosine"))
  tx_factory = functools.partial(optimizer.make_optimizer, config, schedule)
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints)
  opts = train_step_lib.LossOptions.from_config(config)
  teacher = (starting_weights.load_teacher(config, opts.hidden, mesh, opts.features)
             if config.distill == "teacher" else None)
  feature_shapes = (_feature_shapes(model, config, teacher, opts.features) if opts.features
                    else None)
  state, tx = _start_state(model, config, tx_factory, mesh, ckpt, train_source, workdir, is_main,
                           feature_shapes)
  # Optax transformations are pure: this one updates the adapters restored or made above.
  adapter_tx = tx_factory(state.adapters) if opts.features else None
  train_step = train_step_lib.make_train_step(model, space, config, tx,
                                              max(p.num_subnets for p in phases), teacher, mesh,
                                              adapter_tx)
  block, blocks = distributed.process_block(mesh, config.batch_size)
  batches = data.make_train_iterator(
      train_source, batch_size=config.batch_size, seed=config.seed, resolution=config.resolution,
      augment=config.augment, start_step=int(state.step), dataset=config.dataset,
      process_index=block, process_count=blocks, vocab_size=model.input_spec.vocab_size or None)
  return Run(config, workdir, model, space, phases, mesh, schedule, tx, state, train_step,
             batches, ckpt, is_main)


def start_phase(run: Run, index: int) -> TrainState:
  """The run's state at the start of phase ``index`` (see ``starting_weights.phase_start``),
  replicated."""
  phase = run.phases[index]
  state = starting_weights.phase_start(run.state, phase, index, run.model, run.tx, run.config)
  if state is run.state:
    return state
  if run.is_main:
    sorted_note = "channels sorted by importance, " if phase.sort_channels else ""
    print(f"phase {phase.name}: {sorted_note}fresh optimizer state")
  return distributed.replicate(state, run.mesh)


def _log(run: Run, writer: MetricsWriter, done: int, phase: Phase, metrics) -> dict:
  """Writes one metrics record and returns it (host floats); a non-finite loss stops the job,
  saving nothing."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not all(math.isfinite(v) for v in host.values()):
    run.ckpt.wait()
    raise FloatingPointError(
        f"the loss became {host['loss']} at step {done} (phase {phase.name}); stopped without "
        f"saving, the last good checkpoint is step {run.ckpt.latest_step()} in "
        f"{run.ckpt.directory}. Lower config.learning_rate or set config.grad_clip_norm.")
  writer.write(done, {"phase": phase.name, "learning_rate": float(run.schedule(done - 1)),
                      **host})
  return host


def train_loop(run: Run) -> bool:
  """Trains from the state's step to the end of the schedule (or ``config.stop_after_steps``,
  or SIGTERM), logging and checkpointing; returns whether the schedule is complete."""
  config, total = run.config, run.total_steps
  # stop_after_steps: train part of the schedule now and resume later from the same workdir.
  stop = min(total, config.stop_after_steps) if config.get("stop_after_steps") else total
  resolutions = list(config.get("train_resolutions", ()) or [config.resolution])
  start = done = int(run.state.step)
  progress = ProgressBar(total, start=start, per_step=config.batch_size, unit="ex",
                         enabled=run.is_main)
  phase_data, current = None, -1
  writer = MetricsWriter(run.workdir, enabled=run.is_main, purge_step=start or None)
  with PreemptionGuard() as guard, writer:
    for step in range(start, stop):
      index = run.phase_index(step)
      if index != current:
        current, phase_data = index, distributed.replicate(run.phases[index].as_data(), run.mesh)
        if step == run.phase_start(index):
          run.state = start_phase(run, index)
      batch = distributed.shard_batch(next(run.batches), run.mesh, config.batch_size)
      resolution = resolutions[np.random.default_rng([config.seed, step]).integers(
          len(resolutions))]
      run.state, metrics = run.train_step(run.state, batch["inputs"], batch["label"], phase_data,
                                          resolution=resolution)
      done = step + 1
      preempted = guard.requested(done)
      checkpoint_now = (done % config.checkpoint_every_steps == 0 or done in (stop, total)
                        or preempted)
      if done % config.log_every_steps == 0 or checkpoint_now:
        host = _log(run, writer, done, run.phases[index], metrics)
        progress.update(done, f"{run.phases[index].name} loss {host['loss']:.4f}")
      if checkpoint_now:
        run.ckpt.save(done, run.state, {"step": done, "phase": run.phases[index].name})
      if preempted:
        break
  progress.close()
  run.ckpt.close()
  if guard.signalled and run.is_main:
    print(f"SIGTERM: saved checkpoint {done} in {run.ckpt.directory}; rerun the same command to "
          f"resume from it")
  return not guard.signalled and done >= total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains the supernet of ``config`` in ``workdir`` (resuming if it holds checkpoints),
  then evaluates the largest, the smallest and random subnets; returns the eval records.

  Every process of a multi-process job calls this with the same arguments; ``workdir`` must
  be visible to all of them. Returns [] when it stops before the end of the schedule
  (``config.stop_after_steps`` or SIGTERM), after saving a checkpoint to resume from."""
  run = setup(config, workdir)
  if not train_loop(run):
    return []
  return final_evaluation(run.model, run.space, config, run.state, workdir, run.is_main,
                          run.mesh)


# --------------------------------------------------------------------------- evaluation


def final_evaluation(model, space, config, state: TrainState, workdir: str, is_main: bool,
                     mesh=None) -> list[dict]:
  """Top-1 on the test split of the largest, the smallest and random subnets, each with its
  BN statistics calibrated on training batches, through the engine search uses
  (``ofajax.evaluation``); writes eval.json, a metrics record, a table and a plot."""
  named = [("largest", space.largest()), ("smallest", space.smallest())]
  keys = jax.random.split(jax.random.key(config.seed + 2), config.eval.num_random_subnets)
  named += [(space.name(a), a) for a in (space.sample(k) for k in keys)]
  per_call = int(config.eval.get("archs_per_call", 4))
  evaluator = evaluation.make_evaluator(
      model, state.variables, dataset=config.dataset, data_dir=config.data_dir or None,
      resolution=config.resolution, calib_split=config.train_split,
      calib_batch_size=config.eval.calib_batch_size, calib_batches=config.eval.calib_batches,
      seed=config.seed + 1, split=config.test_split, batch_size=config.eval.batch_size,
      chunk_size=-(-len(named) // per_call) * per_call, archs_per_call=per_call, mesh=mesh,
      stream=True, tokenizer=config.get("tokenizer") or None)
  scores = evaluator([a for _, a in named])
  records = []
  for (name, arch), score in zip(named, scores):
    c = cost.count(model, arch, config.resolution)
    records.append({"name": name, "arch": {k: np.asarray(v).tolist() for k, v in arch.items()},
                    "macs": c["macs"], "params": c["params"], "top1": score["top1"]})
  if is_main:
    _write_evaluation(records, int(state.step), workdir, config)
  return records


def _write_evaluation(records: list[dict], step: int, workdir: str, config) -> None:
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(records, f, indent=1)
  with MetricsWriter(workdir, enabled=True) as writer:
    writer.write_records(step, "eval", [
        {k: r[k] for k in ("name", "macs", "params", "top1")} for r in records])
  print(reporting.format_table(records))
  reporting.plot_accuracy_vs_macs(os.path.join(workdir, "accuracy_vs_macs.png"),
                                  f"{config.model}: subnets after BN calibration", records)
