"""The evaluation engine: BN calibration + top-1 / loss for many archs per compiled call.

Training's final evaluation and every search score subnets here, the same way, so
``eval.json`` and a search's ``result.json`` agree by construction. Each arch's BatchNorm
statistics are re-estimated on calibration batches from the *training* data (OFA / US-Nets:
shared BN needs per-subnet statistics), then the arch is scored on evaluation batches.

Archs are data: one jitted function calibrates a chunk of ``chunk_size`` archs and one scores
the chunk on a batch; ``archs_per_call`` of them run side by side (vmap), the groups one after
another (``lax.map``). Any number of archs is padded to whole chunks, so a search compiles each
function once, on its first round. With ``archs_per_call == 1`` padding archs are skipped with
``lax.cond`` (vmapped groups compute everything: cond becomes select under vmap).

Evaluation batches are either resident (a list of placed batches, reused by every chunk: search)
or streamed (a zero-argument callable returning a fresh iterator: a large test split).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ofajax import data, distributed
from ofajax.bn import calibrate_one

# A batch is {"inputs", "label", "mask"} (mask: 1 for real examples, 0 for padding).
Batches = Union[Sequence[dict], Callable[[], Iterable[dict]]]


def stack_archs(archs: list) -> dict:
  return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x, jnp.int32) for x in a]), *archs)


# --------------------------------------------------------------------------- data


def eval_batches(dataset: str, split: str, data_dir, batch_size: int, resolution: int,
                 vocab_size=None, process_index: int = 0, process_count: int = 1,
                 tokenizer: str | None = None):
  """(number of examples in ``split``, an iterator over its batches padded to ``batch_size``:
  this process's block of each global batch, {"inputs", "label", "mask"} numpy). ``tokenizer``:
  text only, a WordPiece file to tokenize with (``config.tokenizer``)."""
  source = data.load(dataset, split, data_dir, tokenizer)
  if not len(source):
    raise ValueError(f"split {split!r} of {dataset} is empty")
  batches = data.make_eval_iterator(
      source, batch_size=batch_size, resolution=resolution, dataset=dataset,
      process_index=process_index, process_count=process_count, vocab_size=vocab_size)
  return len(source), ({"inputs": b["inputs"], "label": b["label"].astype(np.int32),
                        "mask": b["mask"].astype(np.float32)} for b in batches)


def calibration_inputs(dataset: str, split: str, data_dir, batch_size: int, num_batches: int,
                       seed: int, resolution: int, vocab_size=None, process_index: int = 0,
                       process_count: int = 1, tokenizer: str | None = None) -> np.ndarray:
  """[num_batches, batch, ...] un-augmented training inputs for BN calibration."""
  source = data.load(dataset, split, data_dir, tokenizer)
  batches = data.make_train_iterator(
      source, batch_size=batch_size, seed=seed, resolution=resolution, augment="none",
      start_step=0, dataset=dataset, process_index=process_index, process_count=process_count,
      vocab_size=vocab_size)
  return np.stack([next(batches)["inputs"] for _ in range(num_batches)])


# --------------------------------------------------------------------------- compiled parts


def _skip_padding(fn, zeros, archs_per_call: int):
  """lax.map of ``fn`` over (arch, real) pairs; padding archs cost nothing when not vmapped."""
  if archs_per_call > 1:
    return lambda archs, real: jax.lax.map(lambda a: fn(a[0]), (archs, real),
                                           batch_size=archs_per_call)
  return lambda archs, real: jax.lax.map(lambda a: jax.lax.cond(a[1], fn, zeros, a[0]),
                                         (archs, real))


@functools.partial(jax.jit, static_argnames=("model", "archs_per_call"))
def _calibrate_chunk(model, variables, archs, real, calib_inputs, archs_per_call: int):
  """Calibrated batch_stats [K, ...] for K stacked archs."""
  zeros = lambda arch: jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  one = lambda arch: calibrate_one(model, variables, arch, calib_inputs)
  return _skip_padding(one, zeros, archs_per_call)(archs, real)


@functools.partial(jax.jit, static_argnames=("model", "archs_per_call"))
def _score_chunk(model, params, stats, archs, real, inputs, labels, mask, archs_per_call: int):
  """(correct [K], summed cross-entropy [K]) of K stacked archs on one batch."""
  def one(xs):
    arch, arch_stats = xs
    logits = model.apply({"params": params, "batch_stats": arch_stats}, inputs, arch,
                         train=False)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(hit * mask), jnp.sum(nll * mask)

  zeros = lambda xs: (jnp.float32(0), jnp.float32(0))
  return _skip_padding(one, zeros, archs_per_call)((archs, stats), real)


# --------------------------------------------------------------------------- the engine


class Evaluator:
  """Scores archs of one supernet: ``evaluator(archs) -> [{"top1", "loss"}, ...]``.

  ``calib_inputs``: [num_batches, B, ...] placed calibration inputs. ``eval_batches``: placed
  batches (a list, reused) or a callable returning a fresh iterator of them (streamed).
  ``num_examples``: real examples over all evaluation batches (the top-1 denominator).
  ``num_evaluated`` counts real archs, ``num_calls`` compiled calibration calls (chunks).
  """

  def __init__(self, model, variables: dict, calib_inputs, eval_batches: Batches,
               num_examples: int, chunk_size: int = 8, archs_per_call: int = 4):
    if chunk_size < 1 or archs_per_call < 1 or chunk_size % archs_per_call:
      raise ValueError(f"chunk_size ({chunk_size}) must be a positive multiple of archs_per_call "
                       f"({archs_per_call})")
    if num_examples <= 0:
      raise ValueError("the evaluation split is empty")
    if archs_per_call > 1:  # vmapped archs turn active execution's switches into selects
      model = model.clone(execution="masked")
    self.model, self.variables = model, variables
    self.calib_inputs, self.eval_batches, self.num_examples = calib_inputs, eval_batches, num_examples
    self.chunk_size, self.archs_per_call = chunk_size, archs_per_call
    self.num_evaluated = self.num_calls = 0

  def _chunks(self, archs: Sequence[dict]):
    """(stacked archs, real flags) per chunk, padded by repeating the last arch."""
    padded = list(archs) + [archs[-1]] * (-len(archs) % self.chunk_size)
    real = np.arange(len(padded)) < len(archs)
    for i in range(0, len(padded), self.chunk_size):
      yield stack_archs(padded[i:i + self.chunk_size]), jnp.asarray(real[i:i + self.chunk_size])

  def _calibrate(self, archs, real):
    self.num_calls += 1
    return _calibrate_chunk(self.model, self.variables, archs, real, self.calib_inputs,
                            archs_per_call=self.archs_per_call)

  def batches(self) -> Iterable[dict]:
    """The validation batches (read again when the engine holds a reader)."""
    return self.eval_batches() if callable(self.eval_batches) else self.eval_batches

  def __call__(self, archs: Sequence[dict]) -> list[dict]:
    if not archs:
      return []
    correct, loss = [], []
    for chunk, real in self._chunks(archs):
      stats = self._calibrate(chunk, real)
      totals = (jnp.zeros(self.chunk_size), jnp.zeros(self.chunk_size))
      for b in self.batches():
        c, l = _score_chunk(self.model, self.variables["params"], stats, chunk, real,
                            b["inputs"], b["label"], b["mask"], archs_per_call=self.archs_per_call)
        totals = (totals[0] + c, totals[1] + l)
      correct.append(np.asarray(totals[0]))
      loss.append(np.asarray(totals[1]))
    self.num_evaluated += len(archs)
    n = self.num_examples
    return [{"top1": float(c) / n, "loss": float(l) / n} for c, l in
            zip(np.concatenate(correct)[:len(archs)], np.concatenate(loss)[:len(archs)])]

  def calibrated_variables(self, arch: dict) -> dict:
    """The supernet's variables with ``arch``'s calibrated BN statistics, computed by the very
    function that scored it (same chunk shape, so the same numbers)."""
    chunk, real = next(self._chunks([arch]))
    stats = jax.tree.map(lambda s: s[0], self._calibrate(chunk, real))
    return {"params": self.variables["params"], "batch_stats": stats}


# --------------------------------------------------------------------------- construction


def make_evaluator(model, variables: dict, *, dataset: str, data_dir, resolution: int,
                   calib_split: str, calib_batch_size: int, calib_batches: int, seed: int,
                   split: str, batch_size: int, chunk_size: int, archs_per_call: int,
                   mesh=None, stream: bool = False, tokenizer: str | None = None) -> Evaluator:
  """An :class:`Evaluator` on ``split``, calibrating on ``calib_batches`` un-augmented batches
  of ``calib_split`` (shuffled with ``seed``).

  With a ``mesh`` the batches are split over its "data" axis like training's. Calibration
  statistics depend on the batch, so a calibration batch that does not split over the mesh
  (OFA's 100 on 8 GPUs) is calibrated whole on every device rather than changed; the evaluation
  batch only affects speed (padding is masked), so it is rounded up to fit the mesh.
  ``stream``: read the split anew for every chunk instead of keeping it on the devices.
  ``tokenizer``: text only, a WordPiece tokenizer file (``config.tokenizer``).
  """
  mesh = distributed.make_mesh(1) if mesh is None else mesh
  num_shards = mesh.shape[distributed.DATA]
  vocab_size = model.input_spec.vocab_size or None
  split_calib = calib_batch_size % num_shards == 0
  block, blocks = distributed.process_block(mesh, calib_batch_size) if split_calib else (0, 1)
  local = {"inputs": calibration_inputs(dataset, calib_split, data_dir, calib_batch_size,
                                        calib_batches, seed, resolution, vocab_size, block,
                                        blocks, tokenizer)}
  calib = (distributed.shard_batch(local, mesh, calib_batch_size, batch_axis=1) if split_calib
           else distributed.replicate(local, mesh))["inputs"]
  batch_size = -(-batch_size // num_shards) * num_shards
  block, blocks = distributed.process_block(mesh, batch_size)
  read = lambda: eval_batches(dataset, split, data_dir, batch_size, resolution, vocab_size,
                              block, blocks, tokenizer)
  num_examples, first = read()
  place = lambda batches: (distributed.shard_batch(b, mesh, batch_size) for b in batches)
  batches = (lambda: place(read()[1])) if stream else list(place(first))
  return Evaluator(model, variables, calib, batches, num_examples, chunk_size,
                   archs_per_call)
