"""Latency prediction: the whole-net latency model against the per-segment table on synthetic
timings with a known non-additive structure (no wall clock), the model file's round trip and
refusals, and one real timing."""

import json

import numpy as np
import pytest

from ofajax import cost, layers, models
from ofajax.search.greedy import greedy_search
from ofajax.search.latency import LatencyTable, segments
from ofajax.search.latency_model import LatencyModel, errors, spread_archs

RESOLUTION = 28
DISPATCH_MS = 0.2      # per separately compiled call (a whole net pays it once)
NOOP_MS = 0.02         # the table's measured per-call overhead: a no-op is cheaper than a conv
NS_PER_MAC = 0.3       # at batch 1


def _block_macs(module, shape) -> float:
  if isinstance(module, layers.MBConv):
    return float(layers.mbconv_cost(module.spec, shape[0])[0])
  return 2e4  # stem and tail: the same in every arch


def fake_segment_timer(batch):
  """A segment compiled alone: the dispatch cost plus its work, linear in MACs."""
  def timer(name, module, shape):
    if module is None:
      return NOOP_MS
    return DISPATCH_MS + batch * NS_PER_MAC * 1e-6 * _block_macs(module, shape)
  return timer


def fake_whole_timer(model):
  """The whole net: the dispatch cost once, plus work that grows slower than its MACs (XLA
  fuses and caches across blocks), plus a per-block cost: not a sum of the segments' times."""
  def timer(archs, batch):
    out = []
    for arch in archs:
      pieces = segments(model.dense_model(arch), RESOLUTION, 1)
      work = sum(_block_macs(m, s) for _, m, s in pieces) * batch * NS_PER_MAC * 1e-6
      out.append(DISPATCH_MS + 0.01 * len(pieces) + 2.0 * work ** 0.85)
    return out
  return timer


@pytest.fixture(scope="module")
def ofa():
  return models.get("ofa_mbv3_tiny", num_classes=10)


def _unseen(space, fit, n, rng):
  names, out = {space.name(a) for a in fit}, []
  while len(out) < n:
    arch = space.random_host(rng)
    if space.name(arch) not in names:
      names.add(space.name(arch))
      out.append(arch)
  return out


@pytest.mark.parametrize("batch", [1, 32])
def test_model_beats_segment_table_on_non_additive_timings(ofa, batch):
  model, space = ofa
  rng = np.random.default_rng(0)
  fit = spread_archs(space, model, RESOLUTION, 24, rng, pool=400)
  held_out = _unseen(space, fit, 30, rng)
  whole = fake_whole_timer(model)
  lm = LatencyModel("ofa_mbv3_tiny", model, RESOLUTION, (batch,), timer=whole)
  lm.fit(fit, lm.measure(fit))
  table = LatencyTable("ofa_mbv3_tiny", model, RESOLUTION, batch,
                       timer=fake_segment_timer(batch))
  table.measure(fit + held_out)  # the table even sees the held-out archs' segments
  truth = whole(held_out, batch)
  ours = errors([lm.predict(a, batch) for a in held_out], truth)
  theirs = errors([table.predict(a) for a in held_out], truth)
  assert ours["mean_abs_rel_error"] < 0.03, ours
  assert ours["kendall_tau"] > 0.9, ours
  assert theirs["mean_abs_rel_error"] > 5 * ours["mean_abs_rel_error"], (ours, theirs)
  assert ours["kendall_tau"] > theirs["kendall_tau"], (ours, theirs)


def test_model_file_round_trip_and_refusals(ofa, tmp_path):
  model, space = ofa
  rng = np.random.default_rng(1)
  archs = spread_archs(space, model, RESOLUTION, 12, rng, pool=100)
  lm = LatencyModel("ofa_mbv3_tiny", model, RESOLUTION, (1, 32), timer=fake_whole_timer(model))
  lm.fit(archs, lm.measure(archs))
  probe = space.random_host(rng)
  path = str(tmp_path / "latency_model.json")
  lm.save(path, report={"note": "synthetic"})
  again = LatencyModel.load(path, "ofa_mbv3_tiny", model, RESOLUTION, (1, 32))
  for b in (1, 32):
    assert again.predict(probe, b) == lm.predict(probe, b) > 0
  assert lm.predict(probe, 32) > 10 * lm.predict(probe, 1)
  with pytest.raises(ValueError, match=r"another setting \(batch_sizes: file has \[1, 32\]"):
    LatencyModel.load(path, "ofa_mbv3_tiny", model, RESOLUTION, (1, 8))
  with pytest.raises(ValueError, match="resolution: file has 28"):
    LatencyModel.load(path, "ofa_mbv3_tiny", model, 32, (1, 32))
  other, _ = models.get("compofa_mbv3_tiny", num_classes=10)
  with pytest.raises(ValueError, match="model: file has 'ofa_mbv3_tiny'"):
    LatencyModel.load(path, "compofa_mbv3_tiny", other, RESOLUTION, (1, 32))
  shallower, _ = models.get("ofa_mbv3_tiny", num_classes=10, depth_choices=(1, 2))
  with pytest.raises(ValueError, match=r"\(fingerprint: file has '[0-9a-f]+'"):
    LatencyModel.load(path, "ofa_mbv3_tiny", shallower, RESOLUTION, (1, 32))
  raw = json.load(open(path))
  json.dump(dict(raw, device="tpu:v9"), open(path, "w"))
  with pytest.raises(ValueError, match="device: file has 'tpu:v9'"):
    LatencyModel.load(path, "ofa_mbv3_tiny", model, RESOLUTION, (1, 32))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="could not be read"):
    LatencyModel.load(str(tmp_path / "bad.json"), "ofa_mbv3_tiny", model, RESOLUTION, (1, 32))
  with pytest.raises(KeyError, match="no fit at batch 8"):
    lm.predict(probe, 8)


def test_real_timing_of_whole_subnets(ofa):
  """Two archs compiled and timed on this device: the larger one is slower."""
  model, space = models.get("ofa_mbv3_tiny", num_classes=10, depth_choices=(1, 2))
  small, large = space.to_host(space.smallest()), space.to_host(space.largest())
  lm = LatencyModel("ofa_mbv3_tiny", model, RESOLUTION, (8,), warmup=2, seconds=0.1,
                    rounds=3)
  times = lm.measure([small, large])[8]
  assert 0 < times[0] < times[1], times


def test_greedy_slims_until_within_a_latency_bound():
  """A latency that is not a function of MACs alone (depthwise kernels cost extra): the bound
  binds after the MACs target is met, so the path goes on; an unreachable bound is named."""
  model, space = models.get("ofa_mbv3_tiny", num_classes=10, depth_choices=(1, 2))
  cost_fn = lambda arch: _latency_cost(model, arch)
  evaluate = lambda archs: [{"top1": 1e-9 * cost_fn(a)["macs"], "loss": 0.0} for a in archs]
  largest = cost_fn(space.to_host(space.largest()))
  target = 0.9 * largest["macs"]
  free = greedy_search(space, evaluate, cost_fn, [target])
  bound = 0.6 * free["chosen"][target]["latency_ms"]
  out = greedy_search(space, evaluate, cost_fn, [target], bounds={"latency_ms": bound,
                                                                 "params": None})
  chosen = out["chosen"][target]
  assert chosen["latency_ms"] <= bound < free["chosen"][target]["latency_ms"]
  assert chosen["macs"] < free["chosen"][target]["macs"]
  assert all(r["latency_ms"] > bound for r in out["path"][:-1])  # stopped at the first within
  smallest = cost_fn(space.to_host(space.smallest()))["latency_ms"]
  with pytest.raises(ValueError, match="smallest subnet and it exceeds the bounds"):
    greedy_search(space, evaluate, cost_fn, [target], bounds={"latency_ms": 0.5 * smallest})


def _latency_cost(model, arch):
  c = cost.count(model, arch, RESOLUTION, check=False)
  kernels = sum(b.kernel_size ** 2 for b in model.dense_model(arch).blocks)
  return dict(c, latency_ms=1e-6 * c["macs"] + 0.002 * kernels)
