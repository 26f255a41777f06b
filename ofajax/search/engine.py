"""The evaluation engine: BN calibration + validation score for many archs per compiled call.

Every candidate a search proposes is scored the same way: its BatchNorm statistics are
re-estimated on calibration batches from the *training* data (OFA / US-Nets: shared BN needs
per-subnet statistics), then its top-1 and mean cross-entropy are measured on a validation split
that is also carved out of the training data, so the test split never steers a search.

Archs are data, so one jitted function scores a chunk of ``chunk_size`` archs: ``archs_per_call``
of them side by side (vmap), the groups one after another (``lax.map``). A round with any number
of candidates is padded to whole chunks, so a search compiles once, on its first round.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ofajax import data
from ofajax.bn import calibrate_one
from ofajax.evaluation import stack_archs


class SearchData(NamedTuple):
  """Device arrays for scoring: calibration images and a fixed, padded validation set."""
  calib_images: jax.Array   # [num_batches, B, H, W, C]
  valid_images: jax.Array   # [num_batches, B, H, W, C]
  valid_labels: jax.Array   # [num_batches, B] int32
  valid_mask: jax.Array     # [num_batches, B] float32, 0 for padding
  num_valid: int


def eval_arrays(dataset: str, split: str, data_dir, batch_size: int, resolution: int,
                vocab_size=None):
  """One split as fixed-shape arrays: images [n_batches, B, ...], labels, float mask, count."""
  source = data.load(dataset, split, data_dir)
  batches = list(data.make_eval_iterator(source, batch_size=batch_size, resolution=resolution,
                                         dataset=dataset, vocab_size=vocab_size))
  if not batches:
    raise ValueError(f"split {split!r} of {dataset} is empty")
  stack = lambda k: np.stack([b[k] for b in batches])
  mask = stack("mask").astype(np.float32)
  return (jnp.asarray(stack("image")), jnp.asarray(stack("label"), jnp.int32),
          jnp.asarray(mask), int(mask.sum()))


def load_search_data(train_config, search_config, vocab_size=None) -> SearchData:
  """Calibration batches and the validation split named by ``search_config`` (from the
  training config's data set, at its resolution)."""
  dataset, data_dir = train_config.dataset, train_config.data_dir or None
  resolution = int(search_config.get("resolution") or train_config.resolution)
  calib_source = data.load(dataset, search_config.calib_split, data_dir)
  calib = data.make_train_iterator(
      calib_source, batch_size=search_config.calib_batch_size, seed=search_config.seed + 1,
      resolution=resolution, augment="none", dataset=dataset, vocab_size=vocab_size)
  calib_images = np.stack([next(calib)["image"] for _ in range(search_config.calib_batches)])
  valid = eval_arrays(dataset, search_config.valid_split, data_dir,
                      search_config.valid_batch_size, resolution, vocab_size)
  return SearchData(jnp.asarray(calib_images), *valid)


@functools.partial(jax.jit, static_argnames=("model", "archs_per_call"))
def _score_chunk(model, variables, archs, real, calib_images, valid_images, valid_labels,
                 valid_mask, archs_per_call: int):
  """(correct [K], summed loss [K], calibrated batch_stats [K, ...]) for K stacked archs.

  ``real`` [K] marks the archs that are not padding. With ``archs_per_call == 1`` the archs run
  one after another and padding is skipped with ``lax.cond`` (so is every block the depth gates
  off during validation); vmapped groups compute everything (cond becomes select under vmap).
  """
  def one(arch):
    stats = calibrate_one(model, variables, arch, calib_images)
    evaluated = {"params": variables["params"], "batch_stats": stats}

    def batch(totals, xs):
      images, labels, mask = xs
      logits = model.apply(evaluated, images, arch, train=False)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
      hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
      return (totals[0] + jnp.sum(hit * mask), totals[1] + jnp.sum(nll * mask)), None

    (correct, loss), _ = jax.lax.scan(batch, (jnp.float32(0), jnp.float32(0)),
                                      (valid_images, valid_labels, valid_mask))
    return correct, loss, stats

  if archs_per_call > 1:
    return jax.lax.map(lambda a: one(a[0]), (archs, real), batch_size=archs_per_call)

  def skip(arch):
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    return jnp.float32(0), jnp.float32(0), zeros

  return jax.lax.map(lambda a: jax.lax.cond(a[1], one, skip, a[0]), (archs, real))


class Evaluator:
  """Scores archs of one supernet: ``evaluator(archs) -> [{"top1", "loss"}, ...]``.

  ``chunk_size`` archs go through one compiled call (``archs_per_call`` of them vmapped); a list
  of any length is padded to whole chunks by repeating its last arch. ``num_evaluated`` counts
  real archs, ``num_calls`` compiled calls.
  """

  def __init__(self, model, variables: dict, search_data: SearchData, chunk_size: int = 8,
               archs_per_call: int = 4):
    if chunk_size < 1 or archs_per_call < 1 or chunk_size % archs_per_call:
      raise ValueError(f"chunk_size ({chunk_size}) must be a positive multiple of archs_per_call "
                       f"({archs_per_call})")
    self.model, self.variables, self.data = model, variables, search_data
    self.chunk_size, self.archs_per_call = chunk_size, archs_per_call
    self.num_evaluated = self.num_calls = 0

  def _run(self, archs: Sequence[dict]):
    archs = list(archs)
    pad = -len(archs) % self.chunk_size
    padded = archs + [archs[-1]] * pad
    outs = []
    real = np.arange(len(padded)) < len(archs)
    d = self.data
    for i in range(0, len(padded), self.chunk_size):
      chunk = stack_archs(padded[i:i + self.chunk_size])
      outs.append(_score_chunk(self.model, self.variables, chunk,
                               jnp.asarray(real[i:i + self.chunk_size]), d.calib_images,
                               d.valid_images, d.valid_labels, d.valid_mask,
                               archs_per_call=self.archs_per_call))
      self.num_calls += 1
    return outs, len(archs)

  def __call__(self, archs: Sequence[dict]) -> list[dict]:
    if not archs:
      return []
    outs, n = self._run(archs)
    self.num_evaluated += n
    correct = np.concatenate([np.asarray(o[0]) for o in outs])[:n]
    loss = np.concatenate([np.asarray(o[1]) for o in outs])[:n]
    total = self.data.num_valid
    return [{"top1": float(c) / total, "loss": float(l) / total} for c, l in zip(correct, loss)]

  def calibrated_variables(self, arch: dict) -> dict:
    """The supernet's variables with ``arch``'s calibrated BN statistics, computed by the very
    function that scored it (same chunk shape, so the same numbers)."""
    outs, _ = self._run([arch])
    stats = jax.tree.map(lambda s: s[0], outs[0][2])
    return {"params": self.variables["params"], "batch_stats": stats}
