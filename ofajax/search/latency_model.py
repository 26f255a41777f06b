"""Whole-net latency model: time whole dense subnets on this device, fit a small linear model of
their latency on arch features, predict any arch.

A per-segment table (:mod:`ofajax.search.latency`) sums pieces compiled one by one; XLA fuses
the whole network across those pieces and pays the fixed per-call costs once, so on small
networks the sum is far off and ranks archs badly. This model times what will be served: the
dense subnet (``model.dense_model(arch)``) compiled as one function with full optimisation
(:data:`ofajax.models.FAST_COMPILE` makes the compiled code several times slower, so it is not
used here), at each batch size of ``batch_sizes``.

Timing: every arch of a set is compiled first; after ``warmup`` calls each, ``rounds`` rounds
time every arch in turn, repeatedly for ``seconds / rounds``, and an arch's time is the 10th
percentile of all its calls. Interleaving spreads a burst of load over all archs rather than the
one being timed; other processes only ever add time, so a low percentile is what the device
does when it is free (on 2 loaded cores the median of the same archs moved 9-13% between two
timings, the 10th percentile 2-8%). The weights are random (their values do not change the
time).

Model: per batch size, latency_ms = w . [1, features] with non-negative weights, fitted by
least squares on relative error (each row divided by its measured time), so that a 10% miss on
a small subnet counts as much as on a large one. Features (:data:`FEATURES`) are counted from
the dense model's block specs: blocks, pointwise and depthwise MACs, activation elements read
and written, and weights.

A model file (JSON) records the model name and fingerprint, device, backend, batch sizes and
resolution; loading it for anything else fails, naming what differs.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LinearRegression

from ofajax import cost as cost_lib
from ofajax.models.base import Supernet
from ofajax.models.mobilenet import MobileNet
from ofajax.search.latency import (device_name, model_fingerprint, random_variables,
                                   read_matching)
from ofajax.search.predictor import kendall_tau
from ofajax.layers.cnn import se_channels

FEATURES = ("intercept", "blocks", "pointwise_macs", "depthwise_macs", "activations", "weights")


def block_features(spec, hw: int) -> np.ndarray:
  """[1, pointwise MACs, depthwise MACs, activation elements, weights] of one block at input
  size ``hw`` (per image)."""
  out_hw = (hw - 1) // spec.stride + 1
  cin, mid, cout, k = spec.in_channels, spec.mid_channels, spec.out_channels, spec.kernel_size
  expand = spec.has_expand
  se = 2 * mid * se_channels(mid) if spec.use_se else 0
  pointwise = expand * hw * hw * cin * mid + se + out_hw * out_hw * mid * cout
  depthwise = out_hw * out_hw * k * k * mid
  # input, expanded (written, read), depthwise output (written, read), output
  acts = hw * hw * (cin + 2 * expand * mid) + out_hw * out_hw * (2 * mid + cout)
  weights = expand * cin * mid + k * k * mid + mid * cout
  return np.array([1.0, pointwise, depthwise, acts, weights], float)


def dense_features(dense: MobileNet, resolution: int) -> np.ndarray:
  """:data:`FEATURES` of a dense MobileNet: 1, then the block features summed (stem and tail
  are the same for every arch of a space, so the intercept carries them)."""
  hw = (resolution - 1) // dense.stem_stride + 1
  total = np.zeros(len(FEATURES) - 1)
  for spec in dense.blocks:
    total += block_features(spec, hw)
    hw = (hw - 1) // spec.stride + 1
  return np.concatenate([[1.0], total])


def compile_whole(dense, resolution: int, channels: int, batch: int) -> Callable[[], object]:
  """A no-argument call of the dense model, compiled with full optimisation, on one batch."""
  x = jnp.zeros((batch, resolution, resolution, channels), jnp.float32)
  variables = random_variables(dense, x)
  fn = jax.jit(lambda v, x: dense.apply(v, x, train=False)).lower(variables, x).compile()
  return lambda: fn(variables, x)


def time_interleaved(calls: list, warmup: int, seconds: float, rounds: int,
                     quantile: float = 0.1) -> list[float]:
  """Each call's ``quantile`` of its timed calls, in ms: in each of ``rounds`` rounds every
  call in turn is timed repeatedly for ``seconds / rounds`` (at least once)."""
  for call in calls:
    for _ in range(warmup):
      jax.block_until_ready(call())
  times = [[] for _ in calls]
  for _ in range(rounds):
    for i, call in enumerate(calls):
      start = end = time.perf_counter()
      while end - start < seconds / rounds:
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        end = time.perf_counter()
        times[i].append(end - t0)
  return [1e3 * float(np.quantile(t, quantile)) for t in times]


def fit_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Non-negative weights w minimising sum(((x @ w) - y) / y)^2 (x's first column is the
  intercept); columns are scaled to unit size for the solver."""
  scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
  fit = LinearRegression(fit_intercept=False, positive=True)
  fit.fit(x / scale, y, sample_weight=1.0 / y ** 2)
  return fit.coef_ / scale


def errors(predicted, measured) -> dict:
  """{mean_abs_rel_error, max_abs_rel_error, kendall_tau} of predictions against timings."""
  p, m = np.asarray(predicted, float), np.asarray(measured, float)
  rel = np.abs(p - m) / m
  return {"mean_abs_rel_error": float(rel.mean()), "max_abs_rel_error": float(rel.max()),
          "kendall_tau": float(kendall_tau(p, m))}


class LatencyModel:
  """``LatencyModel(name, model, resolution, (1, 32)).measure(archs)``, then ``fit(archs,
  times)`` and ``predict(arch, batch)`` in ms. ``timer(archs, batch) -> [ms]`` replaces the
  device timing (tests inject synthetic timings)."""

  kind = "whole_net"

  def __init__(self, model_name: str, model, resolution: int, batch_sizes=(1, 32),
               warmup: int = 3, seconds: float = 0.3, rounds: int = 10,
               timer: Callable | None = None, compile_threads: int = 2):
    if not isinstance(model, Supernet) or model.input_spec.kind != "image":
      raise ValueError(f"{model_name}: latency models time the dense subnets of image supernets")
    self.model_name, self.model, self.resolution = model_name, model, int(resolution)
    self.batch_sizes = tuple(int(b) for b in batch_sizes)
    self.warmup, self.seconds, self.rounds = warmup, seconds, rounds
    self.timer = timer or self._time_whole
    self.compile_threads = max(1, compile_threads)
    self.weights: dict[int, list[float]] = {}
    self._features: dict[str, np.ndarray] = {}

  def dense(self, arch) -> MobileNet:
    dense = self.model.dense_model(arch)
    if not isinstance(dense, MobileNet):
      raise ValueError(f"{self.model_name}: latency models read MobileNet-style subnets only")
    return dense

  def features(self, arch) -> np.ndarray:
    key = json.dumps({k: np.asarray(v).tolist() for k, v in sorted(arch.items())})
    if key not in self._features:
      self._features[key] = dense_features(self.dense(arch), self.resolution)
    return self._features[key]

  def _time_whole(self, archs, batch: int) -> list[float]:
    channels = self.model.input_spec.channels
    compile_one = lambda a: compile_whole(self.dense(a), self.resolution, channels, batch)
    with ThreadPoolExecutor(self.compile_threads) as pool:  # XLA compiles outside the GIL
      calls = list(pool.map(compile_one, archs))
    return time_interleaved(calls, self.warmup, self.seconds, self.rounds)

  def measure(self, archs) -> dict[int, list[float]]:
    """{batch: [ms per arch]} for every batch size of the model."""
    return {b: list(self.timer(archs, b)) for b in self.batch_sizes}

  def fit(self, archs, times: dict) -> "LatencyModel":
    x = np.stack([self.features(a) for a in archs])
    for b in self.batch_sizes:
      self.weights[b] = fit_relative(x, np.asarray(times[b], float)).tolist()
    return self

  def predict(self, arch, batch: int | None = None) -> float:
    b = self.batch_sizes[0] if batch is None else int(batch)
    if b not in self.weights:
      raise KeyError(f"the latency model has no fit at batch {b} (it has {sorted(self.weights)})")
    return float(self.features(arch) @ np.asarray(self.weights[b]))

  # ------------------------------------------------------------------ JSON
  def header(self) -> dict:
    return {"kind": self.kind, "model": self.model_name,
            "fingerprint": model_fingerprint(self.model), "device": device_name(),
            "backend": jax.default_backend(), "batch_sizes": list(self.batch_sizes),
            "resolution": self.resolution}

  def save(self, path: str, report: dict | None = None) -> None:
    with open(path, "w") as f:
      json.dump({**self.header(), "features": list(FEATURES), "warmup": self.warmup,
                 "seconds": self.seconds, "rounds": self.rounds,
                 "weights": {str(b): w for b, w in self.weights.items()},
                 "report": report}, f, indent=1)

  @classmethod
  def load(cls, path: str, model_name: str, model, resolution: int, batch_sizes
           ) -> "LatencyModel":
    out = cls(model_name, model, resolution, batch_sizes)
    raw = read_matching(path, "latency model", dict(out.header(), features=list(FEATURES)))
    out.warmup, out.seconds, out.rounds = raw["warmup"], raw["seconds"], raw["rounds"]
    out.weights = {int(b): list(w) for b, w in raw["weights"].items()}
    return out


def spread_archs(space, model, resolution: int, n: int, rng, pool: int | None = None
                 ) -> list[dict]:
  """``n`` distinct archs spread evenly over MACs: the largest, the smallest, and the archs at
  evenly spaced MACs quantiles of ``pool`` (default ``max(100, 25 n)``) random ones."""
  cands = [space.to_host(space.largest()), space.to_host(space.smallest())]
  cands += [space.random_host(rng) for _ in range(pool or max(100, 25 * n))]
  unique = {space.name(a): a for a in cands}
  archs = list(unique.values())
  macs = np.array([cost_lib.count(model, a, resolution, check=False)["macs"] for a in archs])
  order = np.argsort(macs, kind="stable")
  picks = np.unique(np.round(np.linspace(0, len(archs) - 1, min(n, len(archs)))).astype(int))
  return [archs[order[i]] for i in picks]


def unseen_archs(space, seen, n: int, rng, tries: int = 100_000) -> list[dict]:
  """Up to ``n`` random archs whose names are not among ``seen``'s."""
  names, out = {space.name(a) for a in seen}, []
  for _ in range(tries):
    if len(out) >= n:
      break
    arch = space.random_host(rng)
    if space.name(arch) not in names:
      names.add(space.name(arch))
      out.append(arch)
  return out


def build(model_name: str, model, space, resolution: int, batch_sizes=(1, 32),
          num_fit: int = 32, num_check: int = 20, seed: int = 0, **timing
          ) -> tuple[LatencyModel, dict]:
  """Times ``num_fit`` archs spread over MACs and ``num_check`` unseen random ones together
  (same conditions), fits on the first and reports the error on the others, per batch size.
  ``timing``: LatencyModel's warmup, seconds, rounds, timer, compile_threads."""
  rng = np.random.default_rng(seed)
  fit = spread_archs(space, model, resolution, num_fit, rng)
  check = unseen_archs(space, fit, num_check, rng)
  lm = LatencyModel(model_name, model, resolution, batch_sizes, **timing)
  t0 = time.perf_counter()
  times = lm.measure(fit + check)
  seconds = time.perf_counter() - t0
  lm.fit(fit, {b: t[:len(fit)] for b, t in times.items()})
  report = {"method": "model", "fit_archs": len(fit), "check_archs": len(check),
            "build_seconds": round(seconds, 1), "batches": {},
            "fit": [dict(name=space.name(a), arch=_lists(a), **{f"ms_batch_{b}": t[i]
                                                                for b, t in times.items()})
                    for i, a in enumerate(fit)]}
  for b, t in times.items():
    rows = [{"name": space.name(a), "arch": _lists(a), "predicted_ms": lm.predict(a, b),
             "measured_ms": m} for a, m in zip(check, t[len(fit):])]
    report["batches"][str(b)] = dict(
        errors([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])
        if rows else {}, checks=rows)
  return lm, report


def _lists(arch) -> dict:
  return {k: np.asarray(v).tolist() for k, v in arch.items()}
