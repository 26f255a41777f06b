"""Active-size execution of the OFA-style MBConv supernets equals masking, the reference.

``execution="active"`` runs each block through static branches at its active middle width and
kernel size; the numbers must be masking's to float32 round-off for every output a caller uses:
eval and train logits, the gradient of every parameter (kernel transform matrices included), the
updated running statistics (inactive channels untouched) and the batch moments BN calibration
sows. And it still compiles once for every arch.

Tolerance: per array, max |active - masked| <= RTOL * max |masked|. The two modes add the same
terms, but convolutions and matmuls of different shapes are blocked differently, so sums round
differently; train-mode BatchNorm divides by batch standard deviations and amplifies that
round-off in the gradients (measured worst case on these archs: ~1e-6 relative). RTOL = 1e-4
leaves room for other CPUs while an error of substance (a wrong slice, a stale statistic, a
missing transform) is of the order of the values themselves. An array that is zero in masking
(skipped blocks, inactive channels) must be exactly zero in the active mode too.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import ofajax
from configs import default
from ofajax import losses, models
from ofajax import train as training
from ofajax.bn import calibrate_one
from ofajax.evaluation import Evaluator
from ofajax.workdir import init_state

RTOL = 1e-4


def _outputs(model, variables, x, labels, arch):
  """Everything a caller reads from one arch: eval / train logits, gradients, updated
  statistics and the batch moments BN calibration averages."""
  def loss(params):
    logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, arch, train=True, mutable=["batch_stats"])
    return losses.cross_entropy(logits, labels, 0.0), (logits, updates["batch_stats"])

  grads, (train_logits, batch_stats) = jax.grad(loss, has_aux=True)(variables["params"])
  return {"eval_logits": model.apply(variables, x, arch, train=False),
          "train_logits": train_logits, "grads": grads, "batch_stats": batch_stats,
          "bn_moments": calibrate_one(model, variables, arch, x.reshape(2, -1, *x.shape[1:]))}


outputs = jax.jit(_outputs, static_argnums=0)


def _max_rel_err(got, want) -> float:
  """The largest leaf-wise error relative to the leaf's scale; checks exact zeros exactly."""
  worst = 0.0
  for path, g, w in jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda *a: a, got, want)):
    pass
  return worst


def assert_tree_close(got, want, rtol=RTOL):
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    scale = float(np.max(np.abs(w)))
    err = float(np.max(np.abs(g - w)))
    assert err <= rtol * scale, (f"{jax.tree_util.keystr(path)}: max error {err:.3g} against "
                                 f"scale {scale:.3g}")
