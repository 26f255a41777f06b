"""Top-1 of many subnets at once: calibrate each arch's BN statistics, then evaluate.

All archs of one call share one compiled function (archs are stacked data), so evaluating a new
set of archs of the same count never recompiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ofajax.bn import calibrate_bn


def stack_archs(archs: list) -> dict:
  return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x, jnp.int32) for x in a]), *archs)


@functools.partial(jax.jit, static_argnames=("model", "archs_per_call"))
def _correct(model, params, stacked_stats, archs, images, labels, mask, archs_per_call: int = 4):
  """[K] number of correctly classified (unmasked) examples of one batch, per arch."""
  def one(args):
    arch, stats = args
    logits = model.apply({"params": params, "batch_stats": stats}, images, arch, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  return jax.lax.map(one, (archs, stacked_stats), batch_size=archs_per_call)


def evaluate_archs(model, variables: dict, archs: list, calib_images: jax.Array, eval_batches,
                   archs_per_call: int = 4) -> tuple[list[float], dict]:
  """Calibrates BN for every arch on ``calib_images`` [num_batches, B, H, W, C], then returns
  (top-1 fractions per arch, the stacked calibrated batch_stats).

  ``eval_batches``: an iterable of {"image", "label", "mask"} batches (one pass over the split).
  """
  stacked = stack_archs(archs)
  stats = calibrate_bn(model, variables, stacked, calib_images, archs_per_call=archs_per_call)
  correct = jnp.zeros((len(archs),), jnp.int32)
  total = 0
  for batch in eval_batches:
    mask = jnp.asarray(batch.get("mask", jnp.ones(batch["label"].shape, bool)))
    correct = correct + _correct(model, variables["params"], stats, stacked,
                                 jnp.asarray(batch["image"]), jnp.asarray(batch["label"]),
                                 mask.astype(jnp.int32), archs_per_call=archs_per_call)
    total += int(mask.sum())
  if total == 0:
    raise ValueError("the evaluation split is empty")
  return [float(c) / total for c in jax.device_get(correct)], stats
