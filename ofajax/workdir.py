"""The on-disk contract of a training workdir, owned here and nowhere else.

A workdir holds what ``train.py`` writes and what search, the teacher loader, ``init_workdir``
and the OFA importer read back:

- ``config.json``: the training config. :func:`model_options` is the one rule that turns its
  JSON back into model options (lists become tuples: modules are hashable jit static args).
- ``checkpoints/<step>/{state,meta}``: orbax checkpoints of a :class:`TrainState` and a JSON of
  host facts (:class:`Checkpoints`).
- :func:`load_supernet`: the trained supernet (model, space, params, BN statistics) read from
  the checkpoint's own metadata, so no optimizer has to be rebuilt, with a clear error when the
  checkpoint does not hold the model the config names.

Multi-host: every process calls ``save`` / ``restore`` with the same step; orbax writes each
replicated array once and restores into the target's sharding. The directory must be one all
processes see. Saves are asynchronous; a run killed during one leaves a temporary directory that
orbax ignores, so the previous checkpoint is the one resumed from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from ofajax import elastic, models

ELASTICIZE = "elasticize"   # config.model for a user's own model (see ofajax.elastic)

CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------- train state


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and checkpoints)."""
  step: jax.Array          # int32 scalar: updates applied so far
  params: Any
  batch_stats: Any         # {} for models without BatchNorm
  opt_state: Any
  rng: jax.Array           # raw key data (uint32), so that orbax can save it

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class DistillState(TrainState):
  """A :class:`TrainState` that also carries feature distillation's adapters (trained, so
  checkpointed) and their own optimizer state. Only runs that distil features use it: every
  other workdir keeps TrainState's checkpoint layout and resumes as before."""
  adapters: Any            # {layer: {"kernel", "bias"}} (see ofajax.feature_distill)
  adapter_opt_state: Any


def add_adapters(state: TrainState, adapters: dict, tx_factory: Callable) -> DistillState:
  """``state`` with ``adapters`` and a fresh state of their optimizer, ``tx_factory(adapters)``
  (the model's recipe: an optimizer built for the params could not take the adapters' tree)."""
  fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}
  return DistillState(**fields, adapters=adapters,
                      adapter_opt_state=tx_factory(adapters).init(adapters))


def new_state(variables: dict, opt_state, rng: jax.Array, step: int = 0) -> TrainState:
  """A :class:`TrainState` from model variables, an optimizer state and a typed PRNG key."""
  return TrainState(step=jnp.int32(step), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=opt_state,
                    rng=jax.random.key_data(rng))


def init_state(model, seed: int, tx_factory: Callable, sample) -> tuple[TrainState, Any]:
  """A fresh state: variables at the largest arch from ``seed``, and the optimizer built for
  them by ``tx_factory(params)``; returns (state, optimizer)."""
  init_key, rng = jax.random.split(jax.random.key(seed))
  variables = models.init(model, init_key, sample)
  tx = tx_factory(variables["params"])
  return new_state(variables, tx.init(variables["params"]), rng), tx


def abstract_state(model, tx_factory: Callable, sample, sharding=None) -> tuple[TrainState, Any]:
  """``init_state``'s (state, optimizer) with ShapeDtypeStructs for arrays, computing nothing:
  the restore target when a checkpoint exists (``sharding``: where to restore every array)."""
  largest = model.search_space().largest()
  variables = jax.eval_shape(model.init, jax.random.key(0), sample, largest)
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  tx = tx_factory(variables["params"])
  state = jax.eval_shape(lambda v: new_state(v, tx.init(v["params"]), jax.random.key(0)),
                         variables)
  return abstract_like(state, sharding), tx


def abstract_like(tree, sharding=None):
  """Shapes, dtypes and shardings of ``tree``: a restore target. Orbax restores each array
  straight into its target's sharding (e.g. replicated over a mesh of many hosts); ``sharding``
  overrides every leaf's, and leaves without one (numpy) get none (orbax then uses the saved)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None)), tree)


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
  """``<workdir>/checkpoints/<step>/{state,meta}``: the train state and a JSON of host facts."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) of ``step`` (default: the latest); raises ValueError if unreadable."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many kinds; the user needs the path and the cause
      raise ValueError(
          f"checkpoint {os.path.join(self.directory, str(step))} could not be read "
          f"({type(e).__name__}: {e}). It was left untouched; move it aside to resume from an "
          f"older step (available: {sorted(self._manager.all_steps())}), or use a new "
          "--workdir.") from e
    return restored["state"], restored["meta"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# --------------------------------------------------------------------------- config.json


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config of ``workdir``, with a clear error when it is not a workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist; pass the --workdir of a "
                            "finished `python train.py` run")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {workdir!r} is not a training workdir (train.py "
                            "writes config.json there when it starts)")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it is written by train.py") from None


def _tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def model_options(config) -> dict:
  """``config.model_options`` as keyword arguments of ``ofajax.models.get``: the same whether
  the config came from a Python file or from JSON (which turned tuples into lists)."""
  options = config.get("model_options", {})
  options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
  return {k: _tuples(v) for k, v in options.items()}


def build_model(config) -> tuple:
  """(model, space) that ``config`` names, run as ``config.execution`` says (see
  :func:`ofajax.models.with_execution`; configs without the key run "auto")."""
  if config.model == ELASTICIZE:   # a user's own Flax model, from config.model_options.factory
    model, space = elastic.from_config_options(model_options(config))
  else:
    model, space = models.get(config.model, **model_options(config))
  return models.with_execution(model, config.get("execution", "auto")), space


# --------------------------------------------------------------------------- trained supernets


@dataclasses.dataclass
class TrainedSupernet:
  """A trained supernet read back from a workdir (the model meets ``ofajax.models.Supernet``)."""
  config: ml_collections.ConfigDict   # the training config
  model: object
  space: object
  variables: dict                     # {"params", "batch_stats"}
  step: int
  workdir: str

  @property
  def model_name(self) -> str:
    return self.config.model


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _stored_metadata(ckpt: Checkpoints, workdir: str, step: int | None):
  """(step, the state's array metadata) of ``step`` or the latest checkpoint."""
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (python train.py "
                            f"--config ... --workdir {workdir})")
  state_dir = os.path.join(ckpt.directory, str(step), "state")
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"no checkpoint of step {step} in {ckpt.directory} (latest: "
                            f"{ckpt.latest_step()})")
  try:
    return step, ocp.StandardCheckpointer().metadata(state_dir).item_metadata
  except Exception as e:  # unreadable metadata: name the directory and the cause
    raise ValueError(f"checkpoint {state_dir} could not be read ({type(e).__name__}: {e})") from e


def _check_fits(config, model, space, stored, where: str) -> None:
  """Raises when the stored parameters are not those of ``model``, naming the first misfit."""
  sample = models.sample_input(model, int(config.resolution))
  expected = jax.eval_shape(model.init, jax.random.key(0), sample, space.largest())
  for part in ("params", "batch_stats"):
    want, got = _shapes(expected.get(part, {})), _shapes(stored[part])
    for name in sorted(set(want) | set(got)):
      if want.get(name) != got.get(name):
        raise ValueError(
            f"checkpoint {where} does not hold a {config.model} {model_options(config)} "
            f"supernet, as its config.json says: {part}{name} is {got.get(name, 'missing')} in "
            f"the checkpoint but {want.get(name, 'absent')} in the model. Was the checkpoint "
            "copied from another workdir?")


def load_supernet(workdir: str, step: int | None = None, sharding=None) -> TrainedSupernet:
  """Reads config.json and the latest (or ``step``'s) checkpoint of a training workdir: only
  the parameters and BN statistics, restored into ``sharding`` when given."""
  config = read_config(workdir)
  model, space = build_model(config)
  ckpt = Checkpoints(workdir)
  try:
    step, stored = _stored_metadata(ckpt, workdir, step)
    _check_fits(config, model, space, stored, os.path.join(ckpt.directory, str(step)))
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            dict(stored))
    state, _ = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  return TrainedSupernet(config, model, space, variables, int(step), workdir)
