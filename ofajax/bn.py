"""BatchNorm re-calibration per subnet (OFA, US-Nets: shared BN + post-hoc statistics).

Training normalises with each subnet's batch statistics, so the running statistics of a
weight-shared supernet fit no subnet in particular. Before evaluating, searching or exporting a
subnet, its statistics are re-estimated as the exact average of per-batch means and variances
over a few training batches (as OFA's ``set_running_statistics`` does). ``calibrate_bn`` is pure
and jitted, and calibrates many archs in one call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _as_stats(moments: dict) -> dict:
  """{"...": {"mean": (m,), "var": (v,)}} (sown tuples) -> {"...": {"mean": m, "var": v}}."""
  return jax.tree.map(lambda t: t[0], moments, is_leaf=lambda t: isinstance(t, tuple))


def calibrate_one(model, variables: dict, arch, images: jax.Array) -> dict:
  """batch_stats for one arch: averages of the batch moments over ``images`` [num_batches, B, ...]."""
  if not variables["batch_stats"]:  # no BatchNorm (transformers): nothing to calibrate
    return {}

  def moments(x):
    _, state = model.apply(variables, x, arch, train=True, mutable=["bn_moments"],
                           rngs={"dropout": jax.random.key(0)})
    return _as_stats(state["bn_moments"])

  def accumulate(total, x):
    return jax.tree.map(jnp.add, total, moments(x)), None

  zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  total, _ = jax.lax.scan(accumulate, zeros, images)
  return jax.tree.map(lambda t: t / images.shape[0], total)


@functools.partial(jax.jit, static_argnames=("model", "archs_per_call"))
def calibrate_bn(model, variables: dict, archs, images: jax.Array, archs_per_call: int = 4) -> dict:
  """Calibrated batch_stats for every arch of a stacked batch of archs (leading axis K).

  ``images``: [num_batches, batch, H, W, C] calibration images (training data, no augmentation).
  Returns batch_stats with a leading K axis. ``archs_per_call`` archs run side by side (vmap);
  the rest of the K run one group after another (lax.map), which bounds memory.
  """
  if archs_per_call > 1:  # vmapped archs turn active execution's switches into selects
    model = model.clone(execution="masked")
  return jax.lax.map(lambda arch: calibrate_one(model, variables, arch, images), archs,
                     batch_size=archs_per_call)
