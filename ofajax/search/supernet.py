"""A trained supernet read back from a training workdir: its config, model, space and weights.

``train.py`` writes ``<workdir>/config.json`` and orbax checkpoints of the whole train state.
Search needs only the parameters and BN statistics, so the restore target is built from the
checkpoint's own metadata (no optimizer has to be rebuilt), and the stored shapes are compared
with the model the config names before anything is restored: a checkpoint of another model is
reported by the first parameter that does not fit, not by an orbax traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from ofajax import models
from ofajax.checkpoint import Checkpoints


@dataclasses.dataclass
class Supernet:
  config: ml_collections.ConfigDict   # the training config
  model: object
  space: object
  variables: dict                     # {"params", "batch_stats"}
  step: int
  workdir: str

  @property
  def model_name(self) -> str:
    return self.config.model


def read_train_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
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


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def load_supernet(workdir: str, step: int | None = None) -> Supernet:
  """Reads config.json and the latest (or ``step``'s) checkpoint of a training workdir."""
  config = read_train_config(workdir)
  # JSON turned the options' tuples into lists; modules must stay hashable (jit static args).
  options = {k: _tuples(v) for k, v in dict(config.get("model_options", {})).items()}
  model, space = models.get(config.model, **options)
  ckpt = Checkpoints(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"no checkpoint in {ckpt.directory}: train first (python train.py --config ... "
          f"--workdir {workdir})")
    state_dir = os.path.join(ckpt.directory, str(step), "state")
    if not os.path.isdir(state_dir):
      raise FileNotFoundError(f"no checkpoint of step {step} in {ckpt.directory} (latest: "
                              f"{ckpt.latest_step()})")
    try:
      stored = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    except Exception as e:  # unreadable metadata: name the directory and the cause
      raise ValueError(f"checkpoint {state_dir} could not be read ({type(e).__name__}: {e})") from e
    expected = jax.eval_shape(model.init, jax.random.key(0),
                              models.sample_input(model, int(config.resolution)), space.largest())
    for part in ("params", "batch_stats"):
      want, got = _shapes(expected.get(part, {})), _shapes(stored.get(part, {}) if hasattr(
          stored, "get") else stored[part])
      for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
          raise ValueError(
              f"checkpoint {state_dir} does not hold a {config.model} "
              f"{dict(config.get('model_options', {}))} supernet, as {workdir}/config.json says: "
              f"{part}{name} is {got.get(name, 'missing')} in the checkpoint but "
              f"{want.get(name, 'absent')} in the model. Was the checkpoint copied from another "
              "workdir?")
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored)
    state, _ = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  return Supernet(config, model, space, variables, int(step), workdir)
