"""Writes imported supernet weights as a training workdir that train.py and search.py read.

The workdir gets what ``train.py`` leaves behind: ``config.json`` and an orbax checkpoint of the
whole train state (``step``, ``params``, ``batch_stats``, ``opt_state``, ``rng``, as
``ofajax.workdir.TrainState``) at the last step of the config's schedule, so the run
counts as finished: train.py resumes into its final evaluation, search.py reads the weights.
"""

from __future__ import annotations


import jax

from ofajax import optimizer, phases
from ofajax import workdir as workdir_lib


def write_workdir(workdir: str, config, variables: dict, meta: dict | None = None) -> int:
  """Saves ``variables`` under ``config`` in a new ``workdir``; returns the checkpoint's step."""
  model, space = workdir_lib.build_model(config)
  expected = jax.eval_shape(model.init, jax.random.key(0), model.input_spec.sample(32),
                            space.largest())
  for part in ("params", "batch_stats"):   # models without BatchNorm init no batch_stats
    want = jax.tree.map(lambda x: (x.shape, x.dtype), expected.get(part, {}))
    got = jax.tree.map(lambda x: (x.shape, x.dtype), variables.get(part, {}))
    if want != got:
      raise ValueError(f"the variables do not fit {config.model} "
                       f"{dict(config.model_options)} ({part} differ)")
  ckpt = workdir_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
  try:
    if ckpt.latest_step() is not None:
      raise FileExistsError(f"{ckpt.directory} already holds checkpoint {ckpt.latest_step()}; "
                            "import into a new --workdir")
    # The schedule's length does not depend on the data set here: the imported config's phases
    # are empty (0 epochs -> 1 step each), so steps_per_epoch=1 gives train.py's count.
    run_phases = [phases.Phase(p, i, space, 1) for i, p in enumerate(config.phases)]
    step = sum(p.steps for p in run_phases)
    tx = optimizer.make_optimizer(config, optimizer.make_schedule(run_phases), variables["params"])
    _, rng = jax.random.split(jax.random.key(config.seed))  # as workdir.init_state splits it
    state = workdir_lib.new_state(variables, jax.jit(tx.init)(variables["params"]), rng, step)
    workdir_lib.write_config(workdir, config)
    ckpt.save(step, state, {"step": step, "phase": run_phases[-1].name, **(meta or {})})
  finally:
    ckpt.close()
  return step
