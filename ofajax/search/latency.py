"""Latency tables (OFA): time each distinct piece of the exported dense subnets once on this
device, then predict any arch's latency as the sum of its pieces.

A dense subnet (:class:`ofajax.models.mobilenet.MobileNet`) is split into a stem, one segment
per block and a tail (head conv, pooling, feature-mix, classifier). A segment's key is its
static description (channels, kernel, stride, activation, SE, input size), so blocks that look
the same share one entry. Each entry is the median of ``repeats`` timed calls of the segment,
compiled on its own, after ``warmup`` calls; ``block_until_ready`` ends every timed call.

Every call of a separately compiled piece pays a fixed dispatch cost that the whole compiled
net pays once, so the table also stores that cost (the median call time of a jitted function
that does nothing but return a scalar from the same input) and a prediction is
``sum(segment - overhead) + overhead``.

A table belongs to one model on one device: its JSON records the model's name and a fingerprint
of its fields, the device, the batch size and the resolution; loading it for anything else fails
with a message saying which of them differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofajax import layers
from ofajax.models.base import Supernet
from ofajax.models.mobilenet import MobileNet


class _Tail(nn.Module):
  """Head conv -> global pool -> optional feature-mix -> classifier, as MobileNet ends."""
  head_width: int
  head_act: str
  feature_mix_width: int
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.ConvBN(self.head_width, act=self.head_act, name="head")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if self.feature_mix_width:
      x = layers.h_swish(nn.Dense(self.feature_mix_width, use_bias=False, name="feature_mix")(x))
    return nn.Dense(self.num_classes, name="classifier")(x)


def segments(dense_model, resolution: int, in_channels: int) -> list[tuple[str, object, tuple]]:
  """(key, module, input shape without batch) per piece of a dense MobileNet."""
  m = dense_model
  out = [(json.dumps(["stem", in_channels, m.stem_width, m.stem_stride, m.stem_act, resolution]),
          layers.ConvBN(m.stem_width, 3, m.stem_stride, m.stem_act),
          (resolution, resolution, in_channels))]
  hw = layers.conv_output_size(resolution, 3, m.stem_stride)
  for spec in m.blocks:
    desc = {k: v for k, v in spec._asdict().items() if k != "name"}
    out.append((json.dumps(["block", hw, sorted(desc.items())]),
                layers.MBConv(spec._replace(name="block"), m.depthwise_impl),
                (hw, hw, spec.in_channels)))
    hw = (hw - 1) // spec.stride + 1
  head_in = m.blocks[-1].out_channels if m.blocks else m.stem_width
  out.append((json.dumps(["tail", hw, head_in, m.head_width, m.head_act, m.feature_mix_width,
                          m.num_classes]),
              _Tail(m.head_width, m.head_act, m.feature_mix_width, m.num_classes),
              (hw, hw, head_in)))
  return out


def time_call(fn, x, warmup: int, repeats: int) -> float:
  """Median wall time of ``fn(x)`` in milliseconds (compiled before, warmed up first)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def random_variables(module, x, seed: int = 0) -> dict:
  """Variables of ``module``'s shapes at input ``x``, without compiling its init (seconds per
  subnet): small normal weights, BN variances of one. Timing does not depend on the values."""
  shapes = jax.eval_shape(lambda k: module.init(k, x, train=False), jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if "var" in jax.tree_util.keystr(path):
      return np.ones(leaf.shape, leaf.dtype)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return jax.device_put(jax.tree.map_with_path(fill, shapes))


def _compiled(module, shape, batch: int):
  x = jnp.zeros((batch,) + tuple(shape), jnp.float32)
  variables = random_variables(module, x)
  fn = jax.jit(lambda x: module.apply(variables, x, train=False))
  return fn.lower(x).compile(), x


def model_fingerprint(model) -> str:
  """A hash of the model's fields (its configuration; not the flax-internal parent and name)."""
  fields = {k: repr(v) for k, v in dataclasses.asdict(model).items() if k not in ("parent", "name")}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')}"


class LatencyTable:
  """``LatencyTable(model_name, model, resolution, batch_size).measure(archs)`` then
  ``predict(arch)`` in milliseconds."""

  def __init__(self, model_name: str, model, resolution: int, batch_size: int = 1,
               warmup: int = 3, repeats: int = 20, timer=None):
    if not isinstance(model, Supernet) or model.input_spec.kind != "image":
      raise ValueError(f"{model_name}: latency tables time the dense subnets of image supernets")
    self.model_name, self.model = model_name, model
    self.resolution, self.batch_size = int(resolution), int(batch_size)
    self.warmup, self.repeats = warmup, repeats
    self.entries: dict[str, float] = {}
    self.overhead_ms: float | None = None
    self.in_channels = model.input_spec.channels
    # timer(key, module, input shape) -> ms; module None: the no-op that measures the per-call
    # overhead. Tests inject synthetic timings.
    self.timer = timer or self._time_segment

  def _segments(self, arch):
    dense = self.model.dense_model(arch)
    if not isinstance(dense, MobileNet):
      raise ValueError(f"{self.model_name}: latency tables split MobileNet-style subnets only")
    return segments(dense, self.resolution, self.in_channels)

  def measure(self, archs, progress=None) -> int:
    """Times every segment of ``archs`` not yet in the table; returns how many were new."""
    if self.overhead_ms is None:
      shape = (self.resolution, self.resolution, self.in_channels)
      self.overhead_ms = self.timer("noop", None, shape)
    new = 0
    for arch in archs:
      for name, module, shape in self._segments(arch):
        if name in self.entries:
          continue
        self.entries[name] = self.timer(name, module, shape)
        new += 1
        if progress is not None:
          progress.update(len(self.entries), "timed")
    return new

  def _time_segment(self, name: str, module, shape) -> float:
    del name
    if module is None:
      x = jnp.zeros((self.batch_size,) + tuple(shape))
      noop = jax.jit(lambda x: x[0, 0, 0, 0]).lower(x).compile()
      return time_call(noop, x, self.warmup, self.repeats)
    fn, x = _compiled(module, shape, self.batch_size)
    return time_call(fn, x, self.warmup, self.repeats)

  def predict(self, arch) -> float:
    total = 0.0
    for name, _, _ in self._segments(arch):
      if name not in self.entries:
        raise KeyError(f"segment {name} is not in the latency table; measure() an arch that "
                       "contains it first")
      total += self.entries[name] - self.overhead_ms
    return total + self.overhead_ms

  def measure_direct(self, arch) -> float:
    """The whole dense subnet compiled as one function, timed like the segments."""
    dense = self.model.dense_model(arch)
    shape = (self.resolution, self.resolution, self.in_channels)
    fn, x = _compiled(dense, shape, self.batch_size)
    return time_call(fn, x, self.warmup, self.repeats)

  # ------------------------------------------------------------------ JSON
  def header(self) -> dict:
    return {"model": self.model_name, "fingerprint": model_fingerprint(self.model),
            "device": device_name(), "batch_size": self.batch_size,
            "resolution": self.resolution}

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump({**self.header(), "warmup": self.warmup, "repeats": self.repeats,
                 "overhead_ms": self.overhead_ms, "entries": self.entries}, f, indent=1)

  @classmethod
  def load(cls, path: str, model_name: str, model, resolution: int, batch_size: int
           ) -> "LatencyTable":
    table = cls(model_name, model, resolution, batch_size)
    raw = read_matching(path, "latency table", table.header())
    table.warmup, table.repeats = raw["warmup"], raw["repeats"]
    table.overhead_ms, table.entries = raw["overhead_ms"], dict(raw["entries"])
    return table


def read_matching(path: str, what: str, want: dict) -> dict:
  """The JSON file at ``path`` (a latency table or model: ``what``), refused unless it records
  every ``want`` key with the same value (model, fingerprint, device, batch, resolution, ...)."""
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{what} {path} could not be read: {e}") from None
  diffs = [f"{k}: file has {raw.get(k)!r}, this search needs {v!r}"
           for k, v in want.items() if raw.get(k) != v]
  if diffs:
    raise ValueError(f"{what} {path} was built for another setting (" + "; ".join(diffs)
                     + "). Build a new one for this model and device (leave "
                     "config.latency.table empty).")
  return raw
