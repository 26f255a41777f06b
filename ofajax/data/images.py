"""Layer 4: image data. Transforms (numpy, one HWC image at a time), the image reader and the
image train / eval iterators.

The transforms return float32 in the 0..255 range; the reader normalises with the data set's
mean / std to the INPUTS of a batch: float32 [b, R, R, C]. `eval_input` describes that evaluation
input as JSON and `eval_preprocess` rebuilds it from one decoded image (serving).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ofajax.data import batching
from ofajax.data.registry import AUGMENTATIONS, DATASETS, DataSpec, lookup_spec, spec_for


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


def normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Transformed pixels (float32, 0..255) -> the model input: scaled to [0, 1], then
  standardised per channel with the data set's mean / std (float32 arrays of C values)."""
  return ((x / 255.0 - mean) / std).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The evaluation input contract: what an exported model reads, for serving.


def _eval_crop(crop_fraction: float | None, spec) -> float | None:
  """The evaluation crop: -1 (the default) means 0.875 for variable-size data sets (imagenet2012)
  and none for fixed-size ones."""
  if crop_fraction is not None and crop_fraction < 0:
    return 0.875 if spec is not None and not spec.fixed_size else None
  return crop_fraction


def eval_input(dataset: str, resolution: int) -> dict:
  """What `make_eval_iterator(source, dataset=dataset, resolution=resolution)` feeds a model,
  as JSON: exports record it (summary.json "input") so that a server turns a decoded image into
  the very input the evaluation engine scored (`eval_preprocess`). It reads the same spec and
  crop default as the iterator's `_setup`, so the two cannot disagree."""
  spec = lookup_spec(dataset)
  if not isinstance(spec, DataSpec):
    raise ValueError(f"{dataset!r} is not a registered image data set; image data sets: "
                     f"{sorted(k for k, v in DATASETS.items() if isinstance(v, DataSpec))}")
  return {"kind": "image", "dataset": dataset, "resolution": int(resolution),
          "channels": spec.channels, "layout": "NHWC", "dtype": "float32",
          "pixels": "uint8 0..255 (decoded image)",
          "crop_fraction": _eval_crop(-1.0, spec),
          "resize": "antialiased bilinear to resolution x resolution when the size differs",
          "normalize": "(pixels / 255 - mean) / std per channel",
          "mean": [float(m) for m in spec.mean], "std": [float(s) for s in spec.std]}


def eval_preprocess(image: np.ndarray, contract: dict) -> np.ndarray:
  """One uint8 HWC image -> the float32 [R, R, C] model input that `contract` (`eval_input`)
  describes, by the same transform and normalisation as the evaluation reader. The image must
  already have the contract's channels: converting them is the caller's decision."""
  image = np.asarray(image)
  image = image[..., None] if image.ndim == 2 else image
  if image.dtype != np.uint8 or image.ndim != 3:
    raise ValueError(f"expected a uint8 HWC image, got {image.dtype} {image.shape}")
  if image.shape[-1] != contract["channels"]:
    raise ValueError(f"the model reads {contract['channels']}-channel images, got "
                     f"{image.shape[-1]} channels")
  x = transform(image, None, augment="none", resolution=contract["resolution"],
                crop_fraction=contract["crop_fraction"])
  return normalize(x, np.asarray(contract["mean"], np.float32),
                   np.asarray(contract["std"], np.float32))


# ------------------------------------------------------------------------------------------------
# Reader.


class ImageReader:
  """The `batching.Reader` of an image split: (normalised float32 [R, R, C] image, label) by
  index, transformed by `augment` (training) or `crop_fraction` (evaluation). Small splits are
  read into memory once (`in_memory`); larger ones record by record."""

  def __init__(self, source, in_memory: bool, image_key: str, label_key: str, *,
               resolution: int, mean: np.ndarray, std: np.ndarray, augment: str = "none",
               crop_fraction: float | None = None, default_channels: int = 1):
    self.source, self.in_memory = source, in_memory
    self.image_key, self.label_key = image_key, label_key
    self.resolution, self.mean, self.std = resolution, mean, std
    self.augment, self.crop_fraction = augment, crop_fraction
    self._channels, self._default_channels = None, default_channels
    self.n = len(source)
    if in_memory:
      records = [source[i] for i in range(self.n)]
      images = [np.asarray(r[image_key]) for r in records]
      same = len({im.shape for im in images}) <= 1
      self.images = np.stack(images) if same and images else images  # list if sizes vary
      self.labels = np.array([int(r[label_key]) for r in records], np.int32)

  def __len__(self) -> int:
    return self.n

  def raw(self, i: int) -> tuple[np.ndarray, int]:
    """(uint8 HWC image, int label) of example i, as stored."""
    if self.in_memory:
      return self.images[i], self.labels[i]
    r = self.source[int(i)]
    return np.asarray(r[self.image_key]), int(r[self.label_key])

  def example(self, index: int, rng_key: tuple[int, ...] | None) -> tuple[np.ndarray, int]:
    image, label = self.raw(index)
    rng = np.random.default_rng(rng_key) if rng_key is not None else None
    x = transform(image, rng, augment=self.augment, resolution=self.resolution,
                  crop_fraction=self.crop_fraction)
    return normalize(x, self.mean, self.std), label

  def padding(self) -> np.ndarray:
    """A zero image (with the channels of the split's first image)."""
    if self._channels is None:
      self._channels = (np.asarray(self.raw(0)[0]).shape[-1] if self.n
                        else self._default_channels)
    return np.zeros((self.resolution, self.resolution, self._channels), np.float32)


def _setup(source, dataset, *, resolution, mean, std, in_memory, num_threads, image_key,
           label_key, process_index, process_count, batch_size, augment, crop_fraction):
  """(reader, p, local, num_threads) of an image split, defaults filled in from its spec."""
  name, spec = spec_for(source, dataset)
  if spec is None and (mean is None or std is None or resolution is None):
    raise ValueError(f"unknown data set {name!r}: pass dataset= (one of {sorted(DATASETS)}) or "
                     "resolution=, mean= and std=")
  crop_fraction = _eval_crop(crop_fraction, spec)
  p, _, local = batching.process_slice(batch_size, process_index, process_count)
  in_memory, num_threads = batching.read_options(len(source), in_memory, num_threads)
  reader = ImageReader(
      source, in_memory, image_key, label_key,
      resolution=resolution or spec.resolution or spec.image_shape[0],
      mean=np.asarray(spec.mean if mean is None else mean, np.float32),
      std=np.asarray(spec.std if std is None else std, np.float32),
      augment=augment, crop_fraction=crop_fraction,
      default_channels=spec.channels if spec is not None else 1)
  return reader, p, local, num_threads


def make_train_iterator(source, *, batch_size: int, seed: int, resolution: int | None = None,
                        augment: str = "none", dataset: str | DataSpec | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        start_step: int = 0, mean=None, std=None, in_memory: bool | None = None,
                        num_threads: int | None = None, image_key: str = "image",
                        label_key: str = "label") -> batching.Batches:
  """Endless image training batches; see `ofajax.data.make_train_iterator`."""
  if augment not in AUGMENTATIONS:
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
  reader, p, local, num_threads = _setup(
      source, dataset, resolution=resolution, mean=mean, std=std, in_memory=in_memory,
      num_threads=num_threads, image_key=image_key, label_key=label_key,
      process_index=process_index, process_count=process_count, batch_size=batch_size,
      augment=augment, crop_fraction=None)
  return batching.train_batches(reader, batch_size=batch_size, seed=seed, p=p, local=local,
                                start_step=start_step, num_threads=num_threads,
                                resolution=reader.resolution)


def make_eval_iterator(source, *, batch_size: int, resolution: int | None = None,
                       dataset: str | DataSpec | None = None, process_index: int | None = None,
                       process_count: int | None = None, crop_fraction: float | None = -1.0,
                       mean=None, std=None, in_memory: bool | None = None,
                       num_threads: int | None = None, image_key: str = "image",
                       label_key: str = "label") -> batching.Batches:
  """One ordered pass of image batches, zero images at padding; see
  `ofajax.data.make_eval_iterator`."""
  reader, p, local, num_threads = _setup(
      source, dataset, resolution=resolution, mean=mean, std=std, in_memory=in_memory,
      num_threads=num_threads, image_key=image_key, label_key=label_key,
      process_index=process_index, process_count=process_count, batch_size=batch_size,
      augment="none", crop_fraction=crop_fraction)
  return batching.eval_batches(reader, batch_size=batch_size, p=p, local=local,
                               num_threads=num_threads, resolution=reader.resolution)
