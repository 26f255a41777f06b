"""Writes imported supernet weights as a training workdir that train.py and search.py read.

The workdir gets what ``train.py`` leaves behind: ``config.json`` and an orbax checkpoint of the
whole train state (``step``, ``params``, ``batch_stats``, ``opt_state``, ``rng``, as
``ofajax.train.init_state`` builds it) at the last step of the config's schedule, so the run
counts as finished: train.py resumes into its final evaluation, search.py reads the weights.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from ofajax import models, train
from ofajax.checkpoint import Checkpoints


def write_workdir(workdir: str, config, variables: dict, meta: dict | None = None) -> int:
  """Saves ``variables`` under ``config`` in a new ``workdir``; returns the checkpoint's step."""
  model, space = models.get(config.model, **dict(config.model_options))
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, model.in_channels)), space.largest()))
  for part in ("params", "batch_stats"):
    want = jax.tree.map(lambda x: (x.shape, x.dtype), expected[part])
    got = jax.tree.map(lambda x: (x.shape, x.dtype), variables[part])
    if want != got:
      raise ValueError(f"the variables do not fit {config.model} "
                       f"{dict(config.model_options)} ({part} differ)")
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints)
  try:
    if ckpt.latest_step() is not None:
      raise FileExistsError(f"{ckpt.directory} already holds checkpoint {ckpt.latest_step()}; "
                            "import into a new --workdir")
    # The schedule's length does not depend on the data set here: the imported config's phases
    # are empty (0 epochs -> 1 step each), so steps_per_epoch=1 gives train.py's count.
    phases = [train.Phase(p, i, space, 1) for i, p in enumerate(config.phases)]
    step = sum(p.steps for p in phases)
    tx = train.make_optimizer(config, train.make_schedule(phases), variables["params"])
    _, rng = jax.random.split(jax.random.key(config.seed))  # as train.init_state splits it
    state = {"step": jnp.int32(step), "params": variables["params"],
             "batch_stats": variables["batch_stats"], "opt_state": jax.jit(tx.init)(variables["params"]),
             "rng": jax.random.key_data(rng)}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    ckpt.save(step, state, {"step": step, "phase": phases[-1].name, **(meta or {})})
  finally:
    ckpt.close()
  return step
