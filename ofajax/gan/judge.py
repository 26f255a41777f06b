"""Scores for the edge -> digit GAN: a Fréchet distance and a recognisability accuracy.

GAN Compression reports FID (Inception-v3 pool features) and, for Cityscapes, the mIoU of a
segmentation network run on the generated images. Neither network's weights can ship here, so a
small digit classifier (the *judge*) plays both parts on 28x28 MNIST:

* **frechet**: the Fréchet distance between Gaussians fitted to the judge's penultimate
  features of generated digits and of the real digits of the same split (FID's formula in a
  64-d feature space; its values are not comparable with published FIDs);
* **accuracy**: the judge's top-1 on generated digits against the labels of the digits their
  edge maps came from (percent), as the segmentation score checks content.

The judge trains deterministically on the GAN's own training split ("train[:-500]") in seconds
and is cached as msgpack under <data_dir>/ofajax_judge/, keyed by a hash of its settings, so
every stage of a compression run and the benchmark score with the same network.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization

from ofajax.gan import data as gan_data
from ofajax.data import registry

# Everything that determines the judge's weights; its hash names the cache file, so a change
# here trains a new judge instead of reusing a stale one.
# (JSON types only: the cached file records them, and they must read back equal.)
SETTINGS = {"version": 1, "dataset": "mnist_5k", "train_split": "train[:-500]",
            "test_split": "test", "conv_widths": [16, 32], "features": 64, "epochs": 12,
            "batch_size": 64, "learning_rate": 2e-3, "max_shift": 2, "seed": 0}
CACHE_FOLDER = "ofajax_judge"
EVAL_BATCH = 500


class DigitClassifier(nn.Module):
  """Conv + max-pool stages and a dense feature layer; returns (logits, features)."""
  conv_widths: tuple = (16, 32)
  features: int = 64

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.conv_widths):
      x = nn.relu(nn.Conv(width, (3, 3), name=f"conv{i}")(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    feats = nn.relu(nn.Dense(self.features, name="features")(x.reshape(x.shape[0], -1)))
    return nn.Dense(10, name="logits")(feats), feats


def _shift(images, key, max_shift: int):
  """Each image translated by up to max_shift pixels (black fill): the augmentation that
  lets 3,500 digits train a judge that reaches ~97% on the test split."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)),
                   constant_values=-1.0)   # -1 is black in [-1, 1]
  offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def _make_step(model, optimizer, max_shift):
  def loss_fn(params, images, labels):
    logits, _ = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, images, labels, key):
    grads = jax.grad(loss_fn)(params, _shift(images, key, max_shift), labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def train_judge(settings: dict = SETTINGS, data_dir=None) -> dict:
  """The judge's params, trained from scratch (deterministic for given settings)."""
  pairs = gan_data.load_pairs(settings["train_split"], data_dir, settings["dataset"])
  model = DigitClassifier(tuple(settings["conv_widths"]), settings["features"])
  key = jax.random.key(settings["seed"])
  params = model.init(key, pairs.digits[:1])["params"]
  steps = settings["epochs"] * (len(pairs) // settings["batch_size"])
  # Cosine decay: a short run still ends at a small step size, which settles the accuracy.
  optimizer = optax.adam(optax.cosine_decay_schedule(settings["learning_rate"], steps))
  opt_state = optimizer.init(params)
  step = _make_step(model, optimizer, settings["max_shift"])
  batches = gan_data.train_batches(pairs, settings["batch_size"], settings["seed"])
  for i, batch in zip(range(steps), batches):
    params, opt_state = step(params, opt_state, batch["digits"], batch["labels"],
                             jax.random.fold_in(key, i))
  return params


class Judge:
  """The trained classifier: `features` (penultimate activations) and `predict` (top-1 class)
  of float32 [-1, 1] NHWC images, jitted, in fixed-size batches (one compilation)."""

  def __init__(self, params, info: dict | None = None, batch_size: int = EVAL_BATCH):
    self.params, self.info, self.batch_size = params, dict(info or {}), batch_size
    convs = sum(name.startswith("conv") for name in params)
    model = DigitClassifier(tuple(int(params[f"conv{i}"]["kernel"].shape[-1])
                                  for i in range(convs)),
                            int(params["features"]["kernel"].shape[-1]))
    self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def outputs(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F] float32, predicted classes [N] int32) of images in one pass."""
    images = np.asarray(images, np.float32)
    feats, preds = [], []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = np.concatenate([chunk, np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:],
                                               np.float32)])   # a fixed shape: no recompiling
      logits, f = self._apply(self.params, padded)
      feats.append(np.asarray(f)[:len(chunk)])
      preds.append(np.asarray(jnp.argmax(logits, -1))[:len(chunk)])
    return np.concatenate(feats), np.concatenate(preds).astype(np.int32)

  def features(self, images) -> np.ndarray:
    return self.outputs(images)[0]

  def predict(self, images) -> np.ndarray:
    return self.outputs(images)[1]


def frechet_distance(feats_a, feats_b) -> float:
  """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^(1/2)) of Gaussians fitted to two feature sets
  [N, F], in float64. Tr (Sa Sb)^(1/2) is the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix Sa^(1/2) Sb Sa^(1/2), which, unlike a general matrix square root, stays
  real and exact when a covariance is singular (ReLU features often are)."""
  a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"need two [N>=2, F] feature sets of equal F, got {a.shape} and {b.shape}")
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  values, vectors = np.linalg.eigh(cov_a)
  root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
  middle = root_a @ cov_b @ root_a
  cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
  mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
  distance = mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
  return float(max(distance, 0.0))   # only round-off takes it below zero


def _padded_batches(images: np.ndarray, batch_size: int):
  """Full batches of `images`, the last one padded with copies of its final row."""
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    yield (np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk), len(chunk)


def score_generator(generate: Callable, pairs: gan_data.PairedSet, judge: Judge,
                    batch_size: int = 250) -> dict:
  """{"frechet", "accuracy"} of `generate(edges_batch) -> images` on a split: the Fréchet
  distance between judge features of its digits and of the split's real digits, and the
  judge's top-1 (percent) on its digits against the real labels. Batches all have
  `batch_size` rows, so a jitted `generate` compiles once."""
  fakes = [np.asarray(generate(batch))[:n] for batch, n in _padded_batches(pairs.edges,
                                                                             batch_size)]
  fake_feats, fake_preds = judge.outputs(np.concatenate(fakes))
  real_feats = judge.features(pairs.digits)
  return {"frechet": frechet_distance(fake_feats, real_feats),
          "accuracy": float(100.0 * np.mean(fake_preds == pairs.labels))}


# --------------------------------------------------------------------------- the cache


def settings_with(overrides) -> dict:
  """SETTINGS with ``overrides`` (a GAN config's ``gan.judge``; e.g. fewer epochs in tests); an
  unknown key is refused, naming the known ones."""
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides or {})
  unknown = sorted(set(overrides) - set(SETTINGS))
  if unknown:
    raise ValueError(f"config.gan.judge has unknown keys {unknown}; known: {sorted(SETTINGS)}")
  return {**SETTINGS, **overrides}


def cache_path(data_dir=None, settings: dict = SETTINGS) -> str:
  """<data_dir>/ofajax_judge/judge-<hash of settings>.msgpack"""
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(registry.resolve_data_dir(data_dir), CACHE_FOLDER, f"judge-{digest}.msgpack")


def _write_atomic(path: str, payload: bytes) -> None:
  # Stages in parallel processes may train the same judge; readers see all of a file or none.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".judge-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def get_judge(data_dir=None, settings: dict = SETTINGS) -> Judge:
  """The judge for these settings: loaded from the cache, else trained, tested and cached.
  `judge.info` holds the settings, its test top-1 ("test_accuracy") and training seconds."""
  path = cache_path(data_dir, settings)
  if os.path.exists(path):
    with open(path, "rb") as f:
      stored = serialization.msgpack_restore(f.read())
    return Judge(stored["params"], json.loads(stored["info"]))
  started = time.perf_counter()
  params = train_judge(settings, data_dir)
  info = {"settings": settings, "train_seconds": round(time.perf_counter() - started, 1)}
  judge = Judge(params, info)
  test = gan_data.load_pairs(settings["test_split"], data_dir, settings["dataset"])
  judge.info["test_accuracy"] = float(100.0 * np.mean(judge.predict(test.digits) == test.labels))
  logging.info("trained the GAN judge in %.1f s: test top-1 %.2f%% (cached at %s)",
               judge.info["train_seconds"], judge.info["test_accuracy"], path)
  _write_atomic(path, serialization.msgpack_serialize(
      {"params": jax.tree.map(np.asarray, params), "info": json.dumps(judge.info)}))
  return judge
