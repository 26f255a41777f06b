"""Where a run's weights come from, and what a phase starts from.

- ``config.init_workdir``: a trained workdir's weights instead of the random init (any workdir
  whose parameters fit: CompOFA from OFA-MobileNetV3 and back);
- ``config.reorder``: transformer heads and FFN neurons re-ordered by importance (DynaBERT);
- ``config.teacher_workdir``: the frozen teacher every subnet distils from (its logits, and
  the intermediate features ``config.distill_features`` names);
- at a phase start: channels re-sorted by importance (OFA's expand phases) and a fresh optimizer
  state (OFA builds a new optimizer per phase).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import numpy as np
import optax

from ofajax import bn, data, distributed, elastic, evaluation, feature_distill, importance
from ofajax import models
from ofajax import workdir as workdir_lib
from ofajax.workdir import TrainState


def init_from_factory(state: TrainState, model, config, is_main: bool) -> TrainState:
  """An elasticized model starts from the pretrained variables its factory returns, if any
  (the largest subnet is then the user's trained model)."""
  fresh = {"params": state.params, "batch_stats": state.batch_stats}
  variables = elastic.factory_variables(model, workdir_lib.model_options(config), fresh)
  if variables is None:
    return state
  if is_main:
    print(f"initialised from the pretrained variables of {config.model_options.factory}")
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def init_from_workdir(state: TrainState, config, is_main: bool) -> TrainState:
  """``config.init_workdir``'s trained weights instead of the random init. Any workdir whose
  parameters cover this model's with the same shapes will do: CompOFA from OFA-MobileNetV3 and
  back (the same layers). Parameters only the source has (e.g. OFA's kernel transforms, for a
  CompOFA without them) are left out and listed; a missing or differently shaped parameter is
  refused, naming the first one."""
  source = workdir_lib.load_supernet(config.init_workdir)
  variables, extra = {}, []
  for name in ("params", "batch_stats"):
    got, want = _flat(source.variables[name]), _flat(getattr(state, name))
    for path, leaf in want.items():
      if path not in got or np.shape(got[path]) != np.shape(leaf):
        found = "lacks it" if path not in got else f"has shape {np.shape(got[path])}"
        raise ValueError(
            f"config.init_workdir {config.init_workdir} holds {source.config.model} weights that "
            f"do not fit this run's {config.model} {workdir_lib.model_options(config)}: {name}"
            f"{path} has shape {np.shape(leaf)} here, the source {found}. Start from a workdir "
            "with the same layers and widths.")
    extra += [name + path for path in got if path not in want]
    variables[name] = jax.tree_util.tree_map_with_path(
        lambda path, _: got[jax.tree_util.keystr(path)], getattr(state, name))
  if is_main:
    print(f"initialised from {config.init_workdir} ({source.config.model}, step {source.step})"
          + (f"; left out {len(extra)} parameters this model lacks: {extra[:4]}" if extra else ""))
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def reorder_by_importance(state: TrainState, model, config, train_source, workdir: str,
                          is_main: bool) -> TrainState:
  """Heads and FFN neurons re-ordered by importance measured on ``config.reorder.batches``
  training batches (DynaBERT); the importance goes to ``<workdir>/importance.json``."""
  num_batches = int(config.reorder.get("batches", 4))
  batches = data.make_train_iterator(
      train_source, batch_size=config.batch_size, seed=config.seed + 3,
      resolution=config.resolution, augment="none", start_step=0, dataset=config.dataset,
      process_index=0, process_count=1, vocab_size=model.input_spec.vocab_size or None)
  variables, scores = importance.reorder_by_importance(
      model, state.variables, [next(batches) for _ in range(num_batches)])
  if is_main:
    with open(os.path.join(workdir, "importance.json"), "w") as f:
      json.dump({k: np.asarray(v).tolist() for k, v in scores.items()}, f)
    print(f"re-ordered heads and FFN neurons by importance ({num_batches} batches; "
          f"{workdir}/importance.json)")
  return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def calibrated_teacher(teacher: workdir_lib.TrainedSupernet, config) -> dict:
  """The teacher's variables with BN statistics calibrated for its largest arch on the run's
  training split, as evaluation calibrates every subnet.

  The stored statistics are running averages over every subnet sampled in training: for a
  sandwich-trained supernet they fit no single arch, and its largest network scored 47% on test
  with them against 97% calibrated (the default workdir, bench/bench_prune_baseline.py). Every
  process reads the same batches, so a replicated teacher stays identical across hosts."""
  if not teacher.variables["batch_stats"]:   # no BatchNorm (transformers): nothing to calibrate
    return teacher.variables
  images = evaluation.calibration_inputs(
      config.dataset, config.train_split, config.data_dir or None, config.eval.calib_batch_size,
      config.eval.calib_batches, seed=config.seed + 1, resolution=int(config.resolution))
  stats = jax.jit(bn.calibrate_one, static_argnums=0)(
      teacher.model, teacher.variables, teacher.space.largest(), images)
  return {**teacher.variables, "batch_stats": stats}


def load_teacher(config, hidden: bool, mesh=None, features=()) -> Callable:
  """A frozen ``inputs -> {"logits"}`` of the largest arch of ``config.teacher_workdir``'s
  supernet (+ ``"extra"``: hidden states, when ``hidden``; + ``"features"``: {layer: output} of
  the layers ``features`` names, checked as ``ofajax.feature_distill.feature_shapes`` checks
  them), replicated over ``mesh`` if given."""
  sharding = distributed.replicated(mesh) if mesh is not None else None
  teacher = workdir_lib.load_supernet(config.teacher_workdir, sharding=sharding)
  model, largest = teacher.model, teacher.space.largest()
  variables = calibrated_teacher(teacher, config)
  if features:
    sample = models.sample_input(model, int(config.resolution))
    try:
      feature_distill.feature_shapes(model, variables, sample, largest, features)
    except ValueError as e:   # the student's names are checked too: say which model this is
      raise ValueError(f"the teacher (config.teacher_workdir {config.teacher_workdir}): {e}") \
          from None
  kwargs = {"return_hidden": True} if hidden else {}

  def forward(inputs):
    out, named = feature_distill.apply_with_features(model, variables, inputs, largest,
                                                     features, train=False, **kwargs)
    logits, extra = out if hidden else (out, None)
    return {"logits": logits, **({"extra": extra} if hidden else {}),
            **({"features": named} if features else {})}
  return forward


def fresh_optimizer_state(tx, state: TrainState):
  """A new optimizer state for ``state.params`` (momentum, Adam moments and their bias
  correction start over, as OFA builds a new optimizer per phase), keeping the schedule's step
  count: the joined schedule of all phases reads it."""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(lambda new, old: old if is_schedule(new) else new,
                      tx.init(state.params), state.opt_state, is_leaf=is_schedule)


def phase_start(state: TrainState, phase, index: int, model, tx, config) -> TrainState:
  """The state phase ``index`` starts from (``state`` itself when nothing changes): its
  expanded channels re-sorted by importance if the phase asks (OFA before each expand phase),
  and a fresh optimizer state after the first phase (OFA builds a new optimizer per phase) or
  after a sort (the old momentum would point at the old channel order)."""
  fresh = phase.sort_channels or (index > 0 and config.get("fresh_optimizer", True))
  if not fresh:
    return state
  if phase.sort_channels:
    variables = importance.sort_channels(model, jax.device_get(state.variables),
                                         expand_stage=phase.expand_stage)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  return state.replace(opt_state=fresh_optimizer_state(tx, state))
