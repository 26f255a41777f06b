"""A thin orbax wrapper: periodic saves, keep the last N, restore into an abstract target.

Multi-host: every process calls ``save`` / ``restore`` with the same step; orbax writes each
replicated array once (from its primary replica) and the metadata from process 0, and restores
into the target's sharding. The directory must be one all processes see (shared file system).
Saves are asynchronous; a run killed during one leaves a temporary directory that orbax
ignores, so the previous checkpoint is the one resumed from."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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
          f"checkpoint {os.path.join(self.directory, str(step))} could not be read ({type(e).__name__}: "
          f"{e}). It was left untouched; move it aside to resume from an older step "
          f"(available: {sorted(self._manager.all_steps())}), or use a new --workdir.") from e
    return restored["state"], restored["meta"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, sharding=None):
  """Shapes, dtypes and shardings of ``tree``: a restore target. Orbax restores each array
  straight into its target's sharding (e.g. replicated over a mesh of many hosts); ``sharding``
  overrides every leaf's, and leaves without one (numpy) get none (orbax then uses the saved)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None)), tree)
