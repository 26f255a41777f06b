"""The paired image-to-image task for GAN compression: MNIST edge map -> digit (pix2pix style).

pix2pix's edges2shoes / edges2handbags pairs are photos with their edge maps; this is the same
task at 28x28x1 on the MNIST sample the repo ships (`ofajax.data.load("mnist_5k", ...)`), so a
teacher, its compressed students and the benchmark train offline in minutes. The condition is a
binary Sobel edge map of the digit, the target the digit itself; both are float32 NHWC in
[-1, 1] (the generators' tanh range), edges and ink at +1.

Splits: "train[:-500]" (3,500 images) trains, "train[-500:]" validates, "test" (1,000) scores.
A split is small, so `load_pairs` holds it in memory and `train_batches` indexes it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from ofajax import data

# Threshold on the Sobel gradient magnitude of images scaled to [0, 1]. A full-contrast step
# edge (0 -> 1) gives a magnitude of 4; at half of that, the faint anti-aliased fringe of a
# stroke and its flat centre fall below it, leaving a clean outline on both sides of each
# stroke (about 18% of the pixels of an MNIST digit image, against 13% of ink).
EDGE_THRESHOLD = 2.0


def _sobel_magnitude(images: np.ndarray) -> np.ndarray:
  """|grad| of float [N, H, W] images by the 3x3 Sobel operator, zero padding (black border)."""
  h, w = images.shape[1:]
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))

  def shifted(dy, dx):
    return padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

  gx = (shifted(-1, 1) + 2 * shifted(0, 1) + shifted(1, 1)
        - shifted(-1, -1) - 2 * shifted(0, -1) - shifted(1, -1))
  gy = (shifted(1, -1) + 2 * shifted(1, 0) + shifted(1, 1)
        - shifted(-1, -1) - 2 * shifted(-1, 0) - shifted(-1, 1))
  return np.hypot(gx, gy)


def edge_map(images_uint8: np.ndarray, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
  """Binary edge maps of uint8 [N, H, W, 1] images: float32 [N, H, W, 1], +1 on an edge and -1
  elsewhere (see EDGE_THRESHOLD)."""
  images = np.asarray(images_uint8, np.float32)[..., 0] / 255.0
  edges = _sobel_magnitude(images) > threshold
  return np.where(edges, 1.0, -1.0).astype(np.float32)[..., None]


def to_unit_range(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 images as float32 in [-1, 1]."""
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class PairedSet:
  """One split of the task in memory: edges [N,28,28,1], digits [N,28,28,1] (float32 in
  [-1, 1]) and labels [N] (int32); row i of each belongs to the same image."""
  edges: np.ndarray
  digits: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def load_pairs(split: str, data_dir=None, dataset: str = "mnist_5k") -> PairedSet:
  """Every record of `split` of `dataset` (through `ofajax.data.load`) as edge/digit pairs, in
  the source's order."""
  source = data.load(dataset, split, data_dir)
  records = source.__getitems__(list(range(len(source))))   # one bulk read, not N
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.array([int(r["label"]) for r in records], np.int32)
  return PairedSet(edge_map(images), to_unit_range(images), labels)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of `n` examples that epoch `epoch` visits; a function of (seed, epoch)
  only, so any step can be reached without replaying the ones before it."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_batches(pairs: PairedSet, batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[dict]:
  """Endless batches {"edges", "digits", "labels"}: epoch after epoch, each a fresh permutation
  cut into whole batches (the last partial batch is dropped). Starting at `start_step` yields
  exactly what an uninterrupted run yields from that step on."""
  per_epoch = len(pairs) // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(pairs)} pairs")
  step = start_step
  while True:
    epoch, position = divmod(step, per_epoch)
    order = epoch_order(len(pairs), seed, epoch)
    for b in range(position, per_epoch):
      rows = order[b * batch_size:(b + 1) * batch_size]
      yield {"edges": pairs.edges[rows], "digits": pairs.digits[rows],
             "labels": pairs.labels[rows]}
    step = (epoch + 1) * per_epoch
