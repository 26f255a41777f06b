"""Supernet training: sandwich rule, in-place / teacher distillation, progressive shrinking.

``train_and_evaluate(config, workdir)`` is the whole job. This module reads top to bottom in
sections: configuration; the optimizer; the jitted train step (the loss of one subnet,
accumulation over subnets, the update); the job (setup, phase starts, loop); the final
evaluation. Phases and the subnets each step samples are ``ofajax.phases``; starting weights,
the teacher and what a phase starts from are ``ofajax.starting_weights``.

One jitted step serves every phase: a phase is *data* (its space's tables, its largest and
smallest arch, how many subnets to run, how to sample them), so progressive shrinking never
recompiles. Only the input resolution is static.

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
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ofajax import cost, data, distributed, evaluation, losses, models, precision, reporting
from ofajax import starting_weights
from ofajax.data import splits
from ofajax.phases import Phase, sample_archs
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
  if config.optimizer not in ("sgd", "adamw"):
    raise ValueError(f"config.optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
  precision.compute_dtype(config.get("compute_dtype", "float32"))


def _distils_hidden(config) -> bool:
  """Whether the loss matches hidden states (transformers: DynaBERT's hidden + embedding MSE)."""
  return bool(config.get("hidden_mse_weight", 0.0) or config.get("embedding_mse_weight", 0.0))


# --------------------------------------------------------------------------- optimizer


def decay_mask(params, depthwise: bool = True) -> Any:
  """Weight decay on weights only: not on BN scale / bias nor on any bias (OFA: 'bn#bias'),
  nor, with ``depthwise=False``, on depthwise kernels (US-Nets decays only regular convs and
  fully connected layers)."""
  def decays(path, _):
    names = [getattr(k, "key", "") for k in path]
    return names[-1] not in ("scale", "bias") and (depthwise or "depthwise" not in names)
  return jax.tree_util.tree_map_with_path(decays, params)


SCHEDULES = ("cosine", "linear")


def make_schedule(phases: list[Phase], kind: str = "cosine"):
  """Each phase restarts its own warmup + decay to 0 (cosine as OFA, or linear as US-Nets), as
  OFA's separate runs do."""
  if kind not in SCHEDULES:
    raise ValueError(f"config.lr_schedule must be one of {SCHEDULES}, got {kind!r}")

  def one(p):
    if kind == "cosine":
      return optax.warmup_cosine_decay_schedule(
          init_value=0.0 if p.warmup_steps else p.learning_rate, peak_value=p.learning_rate,
          warmup_steps=p.warmup_steps, decay_steps=p.steps, end_value=0.0)
    decay = optax.linear_schedule(p.learning_rate, 0.0, p.steps - p.warmup_steps)
    if not p.warmup_steps:
      return decay
    warmup = optax.linear_schedule(0.0, p.learning_rate, p.warmup_steps)
    return optax.join_schedules([warmup, decay], [p.warmup_steps])

  schedules = [one(p) for p in phases]
  boundaries = list(np.cumsum([p.steps for p in phases])[:-1])
  return optax.join_schedules(schedules, boundaries) if len(phases) > 1 else schedules[0]


def make_optimizer(config, schedule, params):
  parts, mask = [], decay_mask(params, config.get("decay_depthwise", True))
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  else:
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask))
  return optax.chain(*parts)


# --------------------------------------------------------------------------- train step


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """What the loss of one subnet needs from the config (static: part of the compiled step)."""
  label_smoothing: float
  kd_weight: float
  kd_temperature: float
  kd_loss: str                 # "soft_ce" | "kl"
  hidden_weight: float         # transformers: MSE of kept layers' outputs to the teacher's
  embedding_weight: float      # transformers: MSE of the embedding output to the teacher's
  inplace: bool                # the largest subnet teaches the others (US-Nets)
  inplace_ce_weight: float     # weight of the labels for the taught subnets when in place
  teacher_ce_weight: float     # weight of the labels with an external teacher (DynaBERT: 0)
  dtype: Any                   # compute dtype

  @classmethod
  def from_config(cls, config) -> "LossOptions":
    return cls(label_smoothing=config.label_smoothing, kd_weight=config.kd_weight,
               kd_temperature=config.kd_temperature, kd_loss=config.get("kd_loss", "soft_ce"),
               hidden_weight=config.get("hidden_mse_weight", 0.0),
               embedding_weight=config.get("embedding_mse_weight", 0.0),
               inplace=config.distill == "inplace",
               inplace_ce_weight=config.get("inplace_ce_weight", 0.0),
               teacher_ce_weight=config.get("teacher_ce_weight", 1.0),
               dtype=precision.compute_dtype(config.get("compute_dtype", "float32")))

  @property
  def hidden(self) -> bool:
    return bool(self.hidden_weight or self.embedding_weight)


def subnet_loss(model, opts: LossOptions, params, batch_stats, arch, inputs, labels, teacher,
                ce_weight, kd_on, hidden_scale, key):
  """Loss of one subnet and (its outputs, its updated batch_stats).

  ``teacher``: None, or {"logits"} (+ "extra": hidden states when distilling them); ``kd_on``
  scales the distillation terms (0 for the in-place teacher itself); ``hidden_scale`` (the
  phase's) scales the hidden-state terms further."""
  if opts.dtype != jnp.float32:
    params = precision.cast_params(params, batch_stats, opts.dtype)
  if jnp.issubdtype(inputs.dtype, jnp.floating):  # token ids keep their integer type
    inputs = inputs.astype(opts.dtype)
  with precision.policy(opts.dtype, batch_stats):
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, inputs, arch,
                               train=True, mutable=["batch_stats"], rngs={"dropout": key},
                               **({"return_hidden": True} if opts.hidden else {}))
  logits, extra = out if opts.hidden else (out, None)
  logits = logits.astype(jnp.float32)
  loss = ce_weight * losses.cross_entropy(logits, labels, opts.label_smoothing)
  if teacher is not None:
    kd = losses.kl_divergence if opts.kd_loss == "kl" else losses.distillation
    loss = loss + kd_on * opts.kd_weight * kd(logits, teacher["logits"], opts.kd_temperature)
    if opts.hidden:
      hidden_loss, embed_loss = losses.hidden_state_mse(extra, teacher["extra"])
      hidden = opts.hidden_weight * hidden_loss + opts.embedding_weight * embed_loss
      loss = loss + kd_on * hidden_scale * hidden
  return loss, ((logits, extra), updates.get("batch_stats", batch_stats))


def _empty_teacher_slot(model, opts: LossOptions, state: TrainState, inputs, largest) -> dict:
  """Zeros shaped like the in-place teacher's outputs (logits, + hidden states), which subnet 0
  (the largest) fills for the others."""
  slot = {"logits": jax.ShapeDtypeStruct((inputs.shape[0], model.num_classes), jnp.float32)}
  if opts.hidden:
    slot["extra"] = jax.eval_shape(
        lambda p: model.apply({"params": p, "batch_stats": state.batch_stats}, inputs, largest,
                              train=False, return_hidden=True)[1], state.params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), slot)


def accumulate_subnets(grad_fn: Callable, opts: LossOptions, state: TrainState, inputs, labels,
                       archs, keys, phase, external_teacher, teacher_slot,
                       unrolled: bool = False):
  """Summed gradients over the stacked subnets, one at a time in a ``lax.scan`` (memory of one
  subnet, one copy of forward + backward in the compiled step); subnets beyond ``num_subnets``
  are skipped with ``lax.cond`` (``phase``: the phase's data). ``unrolled``: one inlined copy
  per subnet and no control flow, subnets beyond ``num_subnets`` computed and discarded (see
  ``SUBNET_LOOPS``). Returns (grads, batch_stats, summed loss, subnet 0's loss)."""

  def body(carry, xs):
    arch, key, i = xs

    def run(carry):
      grads, batch_stats, total, first_loss, slot = carry
      if opts.inplace:  # subnet 0 learns from the labels, the others from its output
        teacher, weight = slot, jnp.where(i == 0, 0.0, 1.0)
        ce_weight = jnp.where(i == 0, 1.0, opts.inplace_ce_weight)
      else:
        ce_weight = opts.teacher_ce_weight if external_teacher is not None else 1.0
        teacher, weight = external_teacher, 1.0
      (loss, ((logits, extra), batch_stats)), g = grad_fn(
          state.params, batch_stats, arch, inputs, labels, teacher, ce_weight, weight,
          phase["hidden_scale"], key)
      if opts.inplace:
        new = {"logits": logits, **({"extra": extra} if opts.hidden else {})}
        slot = jax.tree.map(lambda n, o: jnp.where(i == 0, jax.lax.stop_gradient(n), o),
                            new, slot)
      first_loss = jnp.where(i == 0, loss, first_loss)
      return jax.tree.map(jnp.add, grads, g), batch_stats, total + loss, first_loss, slot

    if unrolled:
      on = i < phase["num_subnets"]
      return jax.tree.map(lambda n, o: jnp.where(on, n, o), run(carry), carry), None
    return jax.lax.cond(i < phase["num_subnets"], run, lambda c: c, carry), None

  init = (jax.tree.map(jnp.zeros_like, state.params), state.batch_stats, jnp.float32(0.0),
          jnp.float32(0.0), teacher_slot)
  xs = (archs, keys, jnp.arange(keys.shape[0]))
  (grads, batch_stats, total, first_loss, _), _ = jax.lax.scan(body, init, xs, unroll=unrolled)
  return grads, batch_stats, total, first_loss


# How the step runs its subnets. "scan": a lax.scan with a lax.cond per subnet (one copy of the
# forward + backward in the program, memory of one subnet). "unrolled": inlined, no control flow.
# XLA:CPU runs lax convolutions inside loops and conditionals many times slower than at top
# level (measured on 2 cores, a 3-conv CNN, batch 128, 3 subnets: 7.1 s a step in a scan, 2.3 s
# without the masking, 0.55 s unrolled), and the built-in supernets avoid lax convolutions
# beyond their stem; a model made with ofajax.elasticize keeps the user's. "auto": unrolled for
# elasticized models on CPU, scan otherwise.
SUBNET_LOOPS = ("auto", "scan", "unrolled")


def unroll_subnets(config) -> bool:
  loop = config.get("subnet_loop", "auto")
  if loop not in SUBNET_LOOPS:
    raise ValueError(f"config.subnet_loop must be one of {SUBNET_LOOPS}, got {loop!r}")
  if loop == "auto":
    return config.model == workdir_lib.ELASTICIZE and jax.default_backend() == "cpu"
  return loop == "unrolled"


def apply_update(tx, state: TrainState, grads, batch_stats) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1)


def make_train_step(model, space, config, tx, max_subnets: int, teacher=None, mesh=None):
  """The jitted step ``(state, inputs, labels, phase, resolution=) -> (state, metrics)``.

  Runs up to ``max_subnets`` subnets on the same batch and applies one update with the summed
  gradients. Subnet 0 is the largest under the sandwich rule (then 1 is the smallest and the
  rest random), otherwise all are random from the phase's space. With in-place distillation
  subnet 0 learns from the labels and the others from its detached output (plus
  ``inplace_ce_weight`` x the labels); with an external ``teacher`` (inputs -> {"logits", ...})
  every subnet learns from the labels and the teacher.

  With a ``mesh`` the step takes the state and phase replicated and inputs / labels split over
  its "data" axis (global arrays placed by ``ofajax.distributed``) and returns the state
  replicated; XLA adds the gradient all-reduce, and BatchNorm statistics and the loss are those
  of the global batch.
  """
  opts = LossOptions.from_config(config)
  grad_fn = jax.value_and_grad(functools.partial(subnet_loss, model, opts), has_aux=True)
  unrolled = unroll_subnets(config)

  def step(state: TrainState, inputs, labels, phase, resolution: int):
    if inputs.ndim == 4 and inputs.shape[1] != resolution:  # images (token ids never resize)
      inputs = jax.image.resize(inputs, (inputs.shape[0], resolution, resolution,
                                         inputs.shape[-1]), "bilinear")
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    arch_key, drop_key = jax.random.split(key)
    archs = sample_archs(space, arch_key, phase, max_subnets)
    slot = _empty_teacher_slot(model, opts, state, inputs, phase["largest"])
    grads, batch_stats, total, first_loss = accumulate_subnets(
        grad_fn, opts, state, inputs, labels, archs, jax.random.split(drop_key, max_subnets),
        phase, None if teacher is None else teacher(inputs), slot, unrolled)
    metrics = {"loss": total / phase["num_subnets"], "loss_largest": first_loss,
               "grad_norm": optax.tree.norm(grads)}
    return apply_update(tx, state, grads, batch_stats), metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0, static_argnames="resolution")
  # Inputs arrive already placed (distributed.replicate / shard_batch): in_shardings would
  # forbid passing the static resolution by keyword. The outputs are pinned so the state stays
  # replicated step after step.
  rep = distributed.replicated(mesh)
  return jax.jit(step, donate_argnums=0, static_argnames="resolution", out_shardings=(rep, rep))


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


def _start_state(model, config, tx_factory, mesh, ckpt, train_source, workdir, is_main):
  """(state, optimizer): restored from the latest checkpoint straight into the replicated
  layout, or initialised on one device (the same values on every process: same seed), given
  its starting weights, then replicated."""
  sample = models.sample_input(model, config.resolution)
  if ckpt.latest_step() is not None:
    target, tx = workdir_lib.abstract_state(model, tx_factory, sample,
                                            distributed.replicated(mesh))
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
  schedule = make_schedule(phases, config.get("lr_schedule", "cosine"))
  tx_factory = functools.partial(make_optimizer, config, schedule)
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints)
  state, tx = _start_state(model, config, tx_factory, mesh, ckpt, train_source, workdir, is_main)
  teacher = (starting_weights.load_teacher(config, LossOptions.from_config(config).hidden, mesh)
             if config.distill == "teacher" else None)
  train_step = make_train_step(model, space, config, tx, max(p.num_subnets for p in phases),
                               teacher, mesh)
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
