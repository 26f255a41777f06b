"""Layer 3: from a reader of examples to host-local batches, for images and text alike.

A `Reader` (implemented by `ofajax.data.images` and `ofajax.data.text`) gives one split's
examples as (model input, label) by index; `train_batches` and `eval_batches` turn it into
`Batches` with the fields of `BATCH_FIELDS`, in the documented order:

Order and state. Epoch e visits the examples in the order `np.random.default_rng([seed, e])
.permutation(n)`, cut into global batches of `batch_size` (the remainder is dropped); process p of
P takes the contiguous slice [p * B/P, (p+1) * B/P) of every global batch. Augmentation draws from
`np.random.default_rng([seed, 1, step, position])`, position being the example's place in the
global batch, so it does not depend on the number of processes or on threads. The whole iterator
state is therefore the global step (`iterator.step`, `iterator.state()`): an iterator made with
`start_step=s` yields exactly the batches an uninterrupted run yields from step s on.

Evaluation makes one ordered pass: global batch i holds examples [i * B, (i + 1) * B), process p
its contiguous slice; positions past the end are padding (the reader's `padding()` input, label
0, mask False), so every process yields the same number of batches.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np

INPUTS, LABEL, MASK = "inputs", "label", "mask"
BATCH_FIELDS: dict[str, str] = {
    INPUTS: "the model input: float32 [b, R, R, C] normalised images, or int32 [b, T] token ids "
            "([CLS] first, 0 = padding)",
    LABEL: "int32 [b] class labels (0 at padding positions)",
    MASK: "bool [b], eval batches only: True for real examples, False for padding",
}
"""The keys of every batch (host-local numpy arrays, b = B / P examples) and what they hold."""

# Splits up to this many examples are read into memory once (numpy) and batches are sliced from
# there in the calling thread; larger ones are read example by example from the array_record
# files by grain's thread pool.
IN_MEMORY_MAX_EXAMPLES = 100_000

AUG_STREAM = 1  # rng stream tag: augmentation uses default_rng([seed, 1, step, position]).


class Reader(Protocol):
  """One split as the batching layer sees it: (model input, label) by example index."""

  in_memory: bool  # whether the split was read into memory at construction

  def __len__(self) -> int:
    ...

  def example(self, index: int, rng_key: tuple[int, ...] | None) -> tuple[np.ndarray, int]:
    """(model input, label) of example `index`. rng_key: the seed of this example's augmentation
    stream, `np.random.default_rng(rng_key)`, in training; None in evaluation."""

  def padding(self) -> np.ndarray:
    """The model input at a padding position of an eval batch."""


class Batches:
  """Iterator over host-local batches; its whole state is the global step.

  `example_fn(k)` returns the k-th host-local example (k = step * local_batch_size + j). With
  num_threads == 0 the examples of a batch are computed in the calling thread; otherwise a grain
  pipeline (MapDataset.range(...).map(example_fn).to_iter_dataset(ReadOptions(num_threads,
  prefetch)).batch(local_batch_size)) computes them in a thread pool ahead of time, in order.
  Setting `step` (or `restore(state)`) repositions the iterator.
  """

  def __init__(self, example_fn: Callable[[int], dict], local_batch_size: int, *,
               start_step: int = 0, num_steps: int | None = None, num_threads: int = 0,
               prefetch: int | None = None, **attributes):
    self._fn, self.local_batch_size = example_fn, local_batch_size
    self.num_steps, self.num_threads = num_steps, num_threads
    self._prefetch = prefetch if prefetch is not None else 2 * local_batch_size
    self._it, self._it_step = None, None
    self._step = int(start_step)
    for k, v in attributes.items():
      setattr(self, k, v)

  @property
  def step(self) -> int:
    return self._step

  @step.setter
  def step(self, value: int):
    self._step, self._it = int(value), None

  def state(self) -> dict[str, int]:
    """Checkpointable state: {"step": global step of the next batch}."""
    return {"step": self._step}

  def restore(self, state: Mapping[str, Any]) -> None:
    self.step = int(state["step"])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __len__(self) -> int:
    if self.num_steps is None:
      raise TypeError("an endless training iterator has no length")
    return self.num_steps

  def _grain_iter(self):
    import grain  # pylint: disable=g-import-not-at-top

    b = self.local_batch_size
    stop = self.num_steps * b if self.num_steps is not None else self._step * b + 2**50
    ds = grain.MapDataset.range(self._step * b, stop).map(self._fn)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                              prefetch_buffer_size=self._prefetch))
    return iter(ds.batch(b))

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_steps is not None and self._step >= self.num_steps:
      raise StopIteration
    b = self.local_batch_size
    if self.num_threads:
      if self._it is None or self._it_step != self._step:
        self._it = self._grain_iter()
      batch = next(self._it)
      self._it_step = self._step + 1
    else:
      examples = [self._fn(k) for k in range(self._step * b, (self._step + 1) * b)]
      batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    self._step += 1
    return batch


# ------------------------------------------------------------------------------------------------
# Order.


def process_slice(batch_size: int, process_index, process_count) -> tuple[int, int, int]:
  """(p, P, B / P): this process, the process count and the host-local batch size."""
  import jax  # pylint: disable=g-import-not-at-top

  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= p < count or batch_size % count:
    raise ValueError(f"global batch_size {batch_size} must split evenly over {count} processes "
                     f"(process_index {p})")
  return p, count, batch_size // count


def read_options(n: int, in_memory: bool | None, num_threads: int | None) -> tuple[bool, int]:
  """(in_memory, num_threads) with their defaults filled in for a split of n examples: in memory
  up to IN_MEMORY_MAX_EXAMPLES, read in the calling thread then, else min(16, cpus) threads."""
  if in_memory is None:
    in_memory = n <= IN_MEMORY_MAX_EXAMPLES
  if num_threads is None:
    num_threads = 0 if in_memory else min(16, os.cpu_count() or 1)
  return in_memory, num_threads


def train_order(n: int, batch_size: int, seed: int, p: int, local: int):
  """(steps_per_epoch, order): order(k) = (step, position in the global batch, example index)
  of the k-th host-local training example, by the documented epoch permutations."""
  steps_per_epoch = n // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size {batch_size} exceeds the {n} examples of the split")
  perms: dict[int, np.ndarray] = {}
  lock = threading.Lock()

  def permutation(epoch: int) -> np.ndarray:
    with lock:
      if epoch not in perms:
        if len(perms) >= 3:  # keep the few epochs that threads may straddle
          del perms[min(perms)]
        perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
      return perms[epoch]

  def order(k: int) -> tuple[int, int, int]:
    step, j = divmod(int(k), local)
    epoch, b = divmod(step, steps_per_epoch)
    position = p * local + j  # in the global batch
    return step, position, int(permutation(epoch)[b * batch_size + position])

  return steps_per_epoch, order


def eval_index(k: int, batch_size: int, p: int, local: int) -> int:
  """Example index of the k-th host-local eval example (>= n: padding)."""
  step, j = divmod(int(k), local)
  return step * batch_size + p * local + j


# ------------------------------------------------------------------------------------------------
# Batches of a reader.


def train_batches(reader: Reader, *, batch_size: int, seed: int, p: int, local: int,
                  start_step: int, num_threads: int, **attributes) -> Batches:
  """Endless training batches {INPUTS, LABEL} of `reader` in the documented order. The Batches
  carry steps_per_epoch, num_examples, batch_size, in_memory and `attributes`."""
  n = len(reader)
  steps_per_epoch, order = train_order(n, batch_size, seed, p, local)

  def example(k: int) -> dict[str, np.ndarray]:
    step, position, index = order(k)
    inputs, label = reader.example(index, (seed, AUG_STREAM, step, position))
    return {INPUTS: inputs, LABEL: np.int32(label)}

  return Batches(example, local, start_step=start_step, num_threads=num_threads,
                 steps_per_epoch=steps_per_epoch, num_examples=n, batch_size=batch_size,
                 in_memory=reader.in_memory, **attributes)


def eval_batches(reader: Reader, *, batch_size: int, p: int, local: int, num_threads: int,
                 **attributes) -> Batches:
  """One ordered pass of ceil(n / B) batches {INPUTS, LABEL, MASK} of `reader`, the last ones
  padded. The Batches carry num_examples, batch_size, in_memory and `attributes`."""
  n = len(reader)

  def example(k: int) -> dict[str, np.ndarray]:
    index = eval_index(k, batch_size, p, local)
    if index >= n:
      return {INPUTS: reader.padding(), LABEL: np.int32(0), MASK: np.bool_(False)}
    inputs, label = reader.example(index, None)
    return {INPUTS: inputs, LABEL: np.int32(label), MASK: np.bool_(True)}

  return Batches(example, local, num_steps=-(-n // batch_size), num_threads=num_threads,
                 num_examples=n, batch_size=batch_size, in_memory=reader.in_memory, **attributes)
