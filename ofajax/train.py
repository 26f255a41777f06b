"""Supernet training: sandwich rule, in-place / teacher distillation, progressive shrinking.

``train_and_evaluate(config, workdir)`` is the whole job. Its parts, in order: configuration
and phases; the jitted train step; state, optimizer and checkpoints; the loop; the final
evaluation (BN calibration per subnet, top-1, eval.json, plot).

One jitted step serves every phase: a phase is *data* (its space's tables, its largest and
smallest arch, how many subnets to run, whether to use the sandwich rule), so progressive
shrinking never recompiles. Only the input resolution is static.

Scale-out (``ofajax.distributed``): the step is jitted over a ("data", "model") mesh of every
device of every process, with the state replicated and the global batch split over "data", so
one CPU, 8 GPUs and a TPU pod slice run the same code; each process reads only its block of
each global batch. ``config.compute_dtype="bfloat16"`` computes in bfloat16 with float32
parameters, optimizer state and BatchNorm (``ofajax.precision``). SIGTERM saves a checkpoint at
the next step boundary and returns (``ofajax.preemption``).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ofajax import cost, data, distributed, losses, models, precision
from ofajax.progress import ProgressBar
from ofajax.checkpoint import Checkpoints, abstract_like
from ofajax.preemption import PreemptionGuard
from ofajax.evaluation import evaluate_archs

# --------------------------------------------------------------------------- configuration


class Phase:
  """A training phase as static facts (host) and as traced data (the step's argument)."""

  def __init__(self, cfg, index: int, space, steps_per_epoch: int):
    self.name = cfg.get("name", f"phase{index}")
    self.steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    # optax's cosine length includes the warmup, which must leave at least one step of decay.
    self.warmup_steps = min(int(round(cfg.get("warmup_epochs", 0.0) * steps_per_epoch)),
                            self.steps - 1)
    self.learning_rate = float(cfg.learning_rate)
    self.num_subnets = int(cfg.num_subnets)
    self.sandwich = cfg.get("sampling", "sandwich") == "sandwich"
    if cfg.get("sampling", "sandwich") not in ("sandwich", "random"):
      raise ValueError(f"phase {self.name!r}: sampling must be 'sandwich' or 'random', "
                       f"got {cfg.sampling!r}")
    if self.sandwich and self.num_subnets < 2:
      raise ValueError(f"phase {self.name!r}: the sandwich rule needs num_subnets >= 2")
    restrict = {k: list(v) for k, v in dict(cfg.get("restrict", {})).items()}
    self.space = space.restrict(**restrict) if restrict else space

  def as_data(self) -> dict:
    return {"tables": self.space.tables(), "largest": self.space.largest(),
            "smallest": self.space.smallest(), "num_subnets": jnp.int32(self.num_subnets),
            "sandwich": jnp.bool_(self.sandwich)}


def _check_config(config) -> None:
  if config.distill not in ("inplace", "teacher", "none"):
    raise ValueError(f"config.distill must be 'inplace', 'teacher' or 'none', got {config.distill!r}")
  if config.distill == "inplace" and any(p.get("sampling", "sandwich") != "sandwich"
                                         for p in config.phases):
    raise ValueError("in-place distillation learns from the largest subnet, so every phase "
                     "needs sampling='sandwich' (or set config.distill to 'teacher' / 'none')")
  if config.distill == "teacher" and not config.teacher_workdir:
    raise ValueError("config.distill='teacher' needs config.teacher_workdir: the workdir of a "
                     "trained full network (e.g. the same config with a single largest-arch phase)")
  if config.get("kd_loss", "soft_ce") not in ("soft_ce", "kl"):
    raise ValueError(f"config.kd_loss must be 'soft_ce' or 'kl', got {config.kd_loss!r}")
  if _hidden_distillation(config) and config.distill == "none":
    raise ValueError("config.hidden_mse_weight / embedding_mse_weight distil hidden states from a "
                     "teacher: set config.distill to 'inplace' or 'teacher'")
  if _hidden_distillation(config) and config.distill == "inplace":
    raise ValueError(
        "hidden-state / embedding distillation needs a fixed teacher: set config.distill="
        "'teacher' and config.teacher_workdir (DynaBERT's setting). In place, the subnets pull "
        "the shared weights toward collapsed hidden states and the largest subnet stops learning.")
  if config.optimizer not in ("sgd", "adamw"):
    raise ValueError(f"config.optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
  precision.compute_dtype(config.get("compute_dtype", "float32"))


def _hidden_distillation(config) -> bool:
  """Whether the loss matches hidden states (transformers: DynaBERT's hidden + embedding MSE)."""
  return bool(config.get("hidden_mse_weight", 0.0) or config.get("embedding_mse_weight", 0.0))


# --------------------------------------------------------------------------- optimizer


def decay_mask(params) -> Any:
  """Weight decay on weights only: not on BN scale / bias nor on any bias (OFA: 'bn#bias')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", "") not in ("scale", "bias"), params)


def make_schedule(phases: list[Phase]):
  """Each phase restarts its own warmup + cosine schedule, as OFA's separate runs do."""
  schedules = [optax.warmup_cosine_decay_schedule(
      init_value=0.0 if p.warmup_steps else p.learning_rate, peak_value=p.learning_rate,
      warmup_steps=p.warmup_steps, decay_steps=p.steps, end_value=0.0) for p in phases]
  boundaries = list(np.cumsum([p.steps for p in phases])[:-1])
  return optax.join_schedules(schedules, boundaries) if len(phases) > 1 else schedules[0]


def make_optimizer(config, schedule, params):
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask(params)))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  else:
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask(params)))
  return optax.chain(*parts)


# --------------------------------------------------------------------------- train step


def make_train_step(model, space, config, tx, max_subnets: int, teacher=None, mesh=None):
  """The jitted step ``(state, images, labels, phase) -> (state, metrics)``.

  Runs up to ``max_subnets`` subnets on the same batch and applies one update with the summed
  gradients. Subnet 0 is the largest under the sandwich rule (then 1 is the smallest and the
  rest random), otherwise all are random from the phase's space. With in-place distillation
  subnet 0 learns from the labels and the others from its detached output (plus
  ``inplace_ce_weight`` x the labels); with an external teacher every subnet learns from the
  labels and the teacher. Gradients are computed one subnet at a time in a ``lax.scan`` so
  memory stays that of one subnet; subnets beyond the phase's count are skipped with
  ``lax.cond`` (no work, no recompilation).

  With a ``mesh`` the step takes the state and phase replicated and images / labels split over
  its "data" axis (global arrays placed by ``ofajax.distributed``) and returns the state
  replicated; XLA
  adds the gradient all-reduce, and BatchNorm statistics and the loss are those of the global
  batch. ``config.compute_dtype`` picks the compute precision (``ofajax.precision``).
  """
  ls, kd_weight, temp = config.label_smoothing, config.kd_weight, config.kd_temperature
  kd_fn = losses.kl_divergence if config.get("kd_loss", "soft_ce") == "kl" else losses.distillation
  hidden = _hidden_distillation(config)
  hidden_w, embed_w = config.get("hidden_mse_weight", 0.0), config.get("embedding_mse_weight", 0.0)
  dtype = precision.compute_dtype(config.get("compute_dtype", "float32"))

  def loss_fn(params, batch_stats, arch, images, labels, teacher, ce_weight, kd_on, key):
    """``teacher``: None, or {"logits"} (+ "extra": hidden states when distilling them)."""
    if dtype != jnp.float32:
      params = precision.cast_params(params, batch_stats, dtype)
    inputs = images.astype(dtype) if jnp.issubdtype(images.dtype, jnp.floating) else images
    with precision.policy(dtype, batch_stats):
      out, updates = model.apply({"params": params, "batch_stats": batch_stats}, inputs, arch,
                                 train=True, mutable=["batch_stats"], rngs={"dropout": key},
                                 **({"return_hidden": True} if hidden else {}))
    logits, extra = out if hidden else (out, None)
    logits = logits.astype(jnp.float32)
    loss = ce_weight * losses.cross_entropy(logits, labels, ls)
    if teacher is not None:
      loss = loss + kd_on * kd_weight * kd_fn(logits, teacher["logits"], temp)
      if hidden:
        hidden_loss, embed_loss = losses.hidden_state_mse(extra, teacher["extra"])
        loss = loss + kd_on * (hidden_w * hidden_loss + embed_w * embed_loss)
    return loss, ((logits, extra), updates.get("batch_stats", batch_stats))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def sample_archs(key, phase):
    archs = jax.vmap(lambda k: space.sample(k, phase["tables"]))(jax.random.split(key, max_subnets))
    if max_subnets >= 2:
      def sandwich(leaf, big, small):
        return leaf.at[0].set(jnp.where(phase["sandwich"], big, leaf[0])).at[1].set(
            jnp.where(phase["sandwich"], small, leaf[1]))
      archs = jax.tree.map(sandwich, archs, phase["largest"], phase["smallest"])
    return archs

  inplace = config.distill == "inplace"

  def step(state, images, labels, phase, resolution: int):
    if images.ndim == 4 and images.shape[1] != resolution:  # images (token ids are never resized)
      images = jax.image.resize(images, (images.shape[0], resolution, resolution,
                                         images.shape[-1]), "bilinear")
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    arch_key, drop_key = jax.random.split(key)
    archs = sample_archs(arch_key, phase)
    params = state["params"]
    external = None if teacher is None else teacher(images)

    # One scan over all subnets keeps a single copy of forward + backward in the compiled step.
    # Subnet 0 fills the in-place teacher slot of the carry; later subnets read it.
    def body(carry, xs):
      arch, k, i = xs

      def run(carry):
        grads, batch_stats, total, first_loss, soft = carry
        if inplace:
          teacher_out = soft
          ce_weight = jnp.where(i == 0, 1.0, config.inplace_ce_weight)
          weight = jnp.where(i == 0, 0.0, 1.0)  # subnet 0 has no teacher yet
        else:
          teacher_out, ce_weight, weight = external, 1.0, 1.0
        (loss, (out, batch_stats)), g = grad_fn(
            params, batch_stats, arch, images, labels, teacher_out, ce_weight, weight, k)
        if inplace:
          logits, extra = out
          new = {"logits": logits, **({"extra": extra} if hidden else {})}
          soft = jax.tree.map(lambda n, o: jnp.where(i == 0, jax.lax.stop_gradient(n), o),
                              new, soft)
        first_loss = jnp.where(i == 0, loss, first_loss)
        return jax.tree.map(jnp.add, grads, g), batch_stats, total + loss, first_loss, soft

      return jax.lax.cond(i < phase["num_subnets"], run, lambda c: c, carry), None

    # The in-place teacher slot: the largest subnet's logits (and hidden states), zeros until
    # subnet 0 fills it.
    soft = {"logits": jax.ShapeDtypeStruct((images.shape[0], model.num_classes), jnp.float32)}
    if hidden:
      soft["extra"] = jax.eval_shape(
          lambda p: model.apply({"params": p, "batch_stats": state["batch_stats"]}, images,
                                phase["largest"], train=False, return_hidden=True)[1], params)
    soft = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), soft)
    init = (jax.tree.map(jnp.zeros_like, params), state["batch_stats"], jnp.float32(0.0),
            jnp.float32(0.0), soft)
    xs = (archs, jax.random.split(drop_key, max_subnets), jnp.arange(max_subnets))
    (grads, batch_stats, total, loss0, _), _ = jax.lax.scan(body, init, xs)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(state, params=optax.apply_updates(params, updates), batch_stats=batch_stats,
                     opt_state=opt_state, step=state["step"] + 1)
    metrics = {"loss": total / phase["num_subnets"], "loss_largest": loss0,
               "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0, static_argnames="resolution")
  # Inputs arrive already placed (distributed.replicate / shard_batch): in_shardings would
  # forbid passing the static resolution by keyword. The outputs are pinned so the state stays
  # replicated step after step.
  rep = distributed.replicated(mesh)
  return jax.jit(step, donate_argnums=0, static_argnames="resolution", out_shardings=(rep, rep))


# --------------------------------------------------------------------------- state


def _state(variables, opt_state, rng) -> dict:
  return {"step": jnp.int32(0), "params": variables["params"],
          "batch_stats": variables["batch_stats"], "opt_state": opt_state,
          "rng": jax.random.key_data(rng)}


def init_state(model, config, tx_factory, sample_images) -> tuple[dict, Any]:
  key = jax.random.key(config.seed)
  init_key, rng = jax.random.split(key)
  variables = models.init(model, init_key, sample_images)
  tx = tx_factory(variables["params"])
  return _state(variables, tx.init(variables["params"]), rng), tx


def abstract_state(model, config, tx_factory, sample_images, sharding=None) -> tuple[dict, Any]:
  """``init_state``'s (state, tx) with ShapeDtypeStructs for arrays, computing nothing: the
  restore target when a checkpoint exists (``sharding``: where to restore every array)."""
  del config  # the seed changes values, not shapes
  largest = model.search_space().largest()
  variables = jax.eval_shape(model.init, jax.random.key(0), sample_images, largest)
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  tx = tx_factory(variables["params"])
  state = jax.eval_shape(lambda v: _state(v, tx.init(v["params"]), jax.random.key(0)), variables)
  return abstract_like(state, sharding), tx


def prepare_weights(state, model, config, train_source, workdir: str, is_main: bool) -> dict:
  """The starting weights of a new run: ``config.init_workdir``'s trained weights instead of the
  random init when given, then (``config.reorder.enabled``) heads and FFN neurons re-ordered by
  importance measured on ``config.reorder.batches`` training batches (DynaBERT). The importance
  goes to ``<workdir>/importance.json``."""
  if config.get("init_workdir"):
    from ofajax.search.supernet import load_supernet  # pylint: disable=g-import-not-at-top
    source = load_supernet(config.init_workdir)
    options = lambda c: json.loads(json.dumps(c.get("model_options", {}).to_dict()))
    if source.config.model != config.model or options(source.config) != options(config):
      raise ValueError(
          f"config.init_workdir {config.init_workdir} holds a {source.config.model} "
          f"{dict(source.config.get('model_options', {}))}, but this run trains a {config.model} "
          f"{dict(config.model_options)}; start from a workdir of the same model")
    state = dict(state, params=source.variables["params"],
                 batch_stats=source.variables["batch_stats"])
    if is_main:
      print(f"initialised from {config.init_workdir} (step {source.step})")
  reorder = config.get("reorder", {})
  if not reorder or not reorder.get("enabled", False):
    return state
  from ofajax import importance  # pylint: disable=g-import-not-at-top
  batches = data.make_train_iterator(
      train_source, batch_size=config.batch_size, seed=config.seed + 3,
      resolution=config.resolution, augment="none", start_step=0, dataset=config.dataset,
      process_index=0, process_count=1, vocab_size=getattr(model, "vocab_size", None))
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  variables, scores = importance.reorder_by_importance(
      model, variables, [next(batches) for _ in range(int(reorder.get("batches", 4)))])
  if is_main:
    with open(os.path.join(workdir, "importance.json"), "w") as f:
      json.dump({k: np.asarray(v).tolist() for k, v in scores.items()}, f)
    print(f"re-ordered heads and FFN neurons by importance ({reorder.get('batches', 4)} batches; "
          f"{workdir}/importance.json)")
  return dict(state, params=variables["params"], batch_stats=variables["batch_stats"])


def load_teacher(config, sample_images, mesh=None):
  """A frozen ``images -> {"logits"}`` of the largest arch (+ ``"extra"``: hidden states when
  the config distils them), from another training workdir (replicated over ``mesh`` if given)."""
  with open(os.path.join(config.teacher_workdir, "config.json")) as f:
    tconf = ml_collections.ConfigDict(json.load(f))
  tmodel, tspace = models.get(tconf.model, **dict(tconf.model_options))
  # The optimizer state's structure does not depend on the schedule's values.
  tx_factory = functools.partial(make_optimizer, tconf, optax.constant_schedule(0.0))
  sharding = distributed.replicated(mesh) if mesh is not None else None
  target, _ = abstract_state(tmodel, tconf, tx_factory, sample_images, sharding)
  state, _ = Checkpoints(config.teacher_workdir).restore(target)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  largest = tspace.largest()
  if _hidden_distillation(config):
    def forward(images):
      logits, extra = tmodel.apply(variables, images, largest, train=False, return_hidden=True)
      return {"logits": logits, "extra": extra}
    return forward
  return lambda images: {"logits": tmodel.apply(variables, images, largest, train=False)}


# --------------------------------------------------------------------------- the job


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains the supernet of ``config`` in ``workdir`` (resuming if it holds checkpoints),
  then evaluates the largest, the smallest and random subnets; returns the eval records.

  Every process of a multi-process job calls this with the same arguments; ``workdir`` must
  be visible to all of them. Returns [] when it stops before the end of the schedule
  (``config.stop_after_steps`` or SIGTERM), after saving a checkpoint to resume from."""
  _check_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  model, space = models.get(config.model, **dict(config.model_options))
  if config.dataset not in data.DATASETS:
    raise ValueError(f"unknown config.dataset {config.dataset!r}; known: {sorted(data.DATASETS)}")
  mesh = distributed.make_mesh(config.get("num_devices", 0))
  num_shards = mesh.shape[distributed.DATA]
  distributed.check_batch_size(config.batch_size, num_shards)
  train_source = data.load(config.dataset, config.train_split, config.data_dir or None)
  steps_per_epoch = max(1, len(train_source) // config.batch_size)
  phases = [Phase(p, i, space, steps_per_epoch) for i, p in enumerate(config.phases)]
  total_steps = sum(p.steps for p in phases)
  max_subnets = max(p.num_subnets for p in phases)
  boundaries = np.cumsum([p.steps for p in phases])
  if is_main:
    print(f"{distributed.describe(mesh)}; global batch {config.batch_size} "
          f"({config.batch_size // num_shards} per device), "
          f"compute {config.get('compute_dtype', 'float32')}")
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  sample = models.sample_input(model, config.resolution)
  schedule = make_schedule(phases)
  tx_factory = functools.partial(make_optimizer, config, schedule)
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints)
  start = 0
  if ckpt.latest_step() is not None:
    # Restored straight into the replicated layout; nothing is initialised first.
    target, tx = abstract_state(model, config, tx_factory, sample, distributed.replicated(mesh))
    state, _ = ckpt.restore(target)
    start = int(state["step"])
    if is_main:
      print(f"resumed from {ckpt.directory} at step {start}")
  else:
    # Initialised on one device (the same values on every process: same seed), then replicated.
    state, tx = init_state(model, config, tx_factory, sample)
    state = prepare_weights(state, model, config, train_source, workdir, is_main)
    state = distributed.replicate(state, mesh)
  teacher = load_teacher(config, sample, mesh) if config.distill == "teacher" else None
  train_step = make_train_step(model, space, config, tx, max_subnets, teacher, mesh)

  block, blocks = distributed.process_block(mesh, config.batch_size)
  train_iter = data.make_train_iterator(
      train_source, batch_size=config.batch_size, seed=config.seed, resolution=config.resolution,
      augment=config.augment, start_step=start, dataset=config.dataset, process_index=block,
      process_count=blocks, vocab_size=getattr(model, "vocab_size", None))
  resolutions = list(config.get("train_resolutions", ()) or [config.resolution])
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  progress = ProgressBar(total_steps, start=start, per_step=config.batch_size, unit="ex",
                         enabled=is_main)
  phase_data, phase_index = None, -1
  last_metrics = None
  # stop_after_steps: train part of the schedule now and resume later from the same workdir.
  stop = min(total_steps, config.stop_after_steps) if config.get("stop_after_steps") else total_steps
  done = start
  with PreemptionGuard() as guard:
    for step in range(start, stop):
      index = int(np.searchsorted(boundaries, step, side="right"))
      if index != phase_index:
        phase_index = index
        phase_data = distributed.replicate(phases[index].as_data(), mesh)
      batch = distributed.shard_batch(next(train_iter), mesh, config.batch_size)
      resolution = resolutions[np.random.default_rng([config.seed, step]).integers(len(resolutions))]
      state, last_metrics = train_step(state, batch["image"], batch["label"], phase_data,
                                       resolution=resolution)
      done = step + 1
      preempted = guard.requested(done)
      checkpoint_now = (done % config.checkpoint_every_steps == 0 or done in (stop, total_steps)
                        or preempted)
      if done % config.log_every_steps == 0 or checkpoint_now:
        host = {k: float(v) for k, v in jax.device_get(last_metrics).items()}
        if not all(math.isfinite(v) for v in host.values()):
          ckpt.wait()
          raise FloatingPointError(
              f"the loss became {host['loss']} at step {done} (phase {phases[index].name}); "
              f"stopped without saving, the last good checkpoint is step {ckpt.latest_step()} in "
              f"{ckpt.directory}. Lower config.learning_rate or set config.grad_clip_norm.")
        record = {"step": done, "phase": phases[index].name,
                  "learning_rate": float(schedule(done - 1)), **host}
        if is_main:
          with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        progress.update(done, f"{phases[index].name} loss {host['loss']:.4f}")
        if checkpoint_now:
          ckpt.save(done, state, {"step": done, "phase": phases[index].name})
      if preempted:
        break
  progress.close()
  ckpt.close()
  if guard.signalled:
    if is_main:
      print(f"SIGTERM: saved checkpoint {done} in {ckpt.directory}; rerun the same command to "
            f"resume from it")
    return []
  if int(state["step"]) < total_steps:
    return []  # stopped early on purpose: evaluate when the schedule is done
  return final_evaluation(model, space, config, state, workdir, is_main, mesh)


# --------------------------------------------------------------------------- evaluation


def final_evaluation(model, space, config, state, workdir: str, is_main: bool,
                     mesh=None) -> list[dict]:
  """BN calibration and top-1 of the largest, the smallest and random subnets; with a
  ``mesh`` the calibration and test batches are split over its "data" axis like training's."""
  mesh = distributed.make_mesh(1) if mesh is None else mesh
  num_shards = mesh.shape[distributed.DATA]
  calib_batch = config.eval.calib_batch_size
  # Calibration statistics depend on the batch, so a batch that does not split over the mesh
  # (OFA's 100 on 8 GPUs) is calibrated whole on every device rather than changed. The test
  # batch only affects speed (padding is masked): it is rounded up to fit the mesh.
  split = calib_batch % num_shards == 0
  eval_batch = -(-config.eval.batch_size // num_shards) * num_shards
  calib_source = data.load(config.dataset, config.train_split, config.data_dir or None)
  block, blocks = distributed.process_block(mesh, calib_batch) if split else (0, 1)
  calib = data.make_train_iterator(calib_source, batch_size=calib_batch,
                                   seed=config.seed + 1, resolution=config.resolution,
                                   augment="none", start_step=0, dataset=config.dataset,
                                   process_index=block, process_count=blocks,
                                   vocab_size=getattr(model, "vocab_size", None))
  local = {"image": np.stack([next(calib)["image"] for _ in range(config.eval.calib_batches)])}
  calib_images = (distributed.shard_batch(local, mesh, calib_batch, batch_axis=1) if split
                  else distributed.replicate(local, mesh))["image"]
  named = [("largest", space.largest()), ("smallest", space.smallest())]
  keys = jax.random.split(jax.random.key(config.seed + 2), config.eval.num_random_subnets)
  named += [(space.name(a), a) for a in (space.sample(k) for k in keys)]
  test_source = data.load(config.dataset, config.test_split, config.data_dir or None)
  block, blocks = distributed.process_block(mesh, eval_batch)
  local_batches = data.make_eval_iterator(test_source, batch_size=eval_batch,
                                          resolution=config.resolution, dataset=config.dataset,
                                          process_index=block, process_count=blocks,
                                          vocab_size=getattr(model, "vocab_size", None))
  batches = (distributed.shard_batch(b, mesh, eval_batch) for b in local_batches)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  top1, _ = evaluate_archs(model, variables, [a for _, a in named], calib_images, batches)
  records = []
  for (name, arch), acc in zip(named, top1):
    c = cost.count(model, arch, config.resolution)
    records.append({"name": name, "arch": {k: np.asarray(v).tolist() for k, v in arch.items()},
                    "macs": c["macs"], "params": c["params"], "top1": acc})
  if is_main:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(records, f, indent=1)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": int(state["step"]), "eval": [
          {k: r[k] for k in ("name", "macs", "params", "top1")} for r in records]}) + "\n")
    print(format_table(records))
    plot_accuracy_vs_macs(records, os.path.join(workdir, "accuracy_vs_macs.png"))
  return records


def format_table(records: list[dict]) -> str:
  width = max(len(r["name"]) for r in records)
  lines = [f"{'subnet':<{width}}  {'MACs':>12}  {'params':>10}  {'top-1':>6}"]
  for r in sorted(records, key=lambda r: r["macs"]):
    lines.append(f"{r['name']:<{width}}  {r['macs']:>12,}  {r['params']:>10,}  {100 * r['top1']:>5.2f}%")
  return "\n".join(lines)


def plot_accuracy_vs_macs(records: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
  for r in records:
    style = {"largest": ("tab:red", "largest"), "smallest": ("tab:blue", "smallest")}.get(
        r["name"], ("tab:gray", None))
    ax.scatter(r["macs"] / 1e6, 100 * r["top1"], color=style[0], label=style[1])
  ax.set_xlabel("MACs (M)")
  ax.set_ylabel("top-1 (%)")
  ax.set_title("subnets after BN calibration")
  ax.legend(loc="lower right")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)

