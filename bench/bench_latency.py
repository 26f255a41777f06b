"""Latency prediction on this device: the whole-net latency model
(:mod:`ofajax.search.latency_model`) against OFA's per-segment table
(:mod:`ofajax.search.latency`), on archs neither was fitted on.

Per model: the latency model is built as ``search.py`` builds it (``--num_fit`` archs spread
over MACs and ``--num_check`` unseen random archs, all timed whole at every batch size, fitted
on the first); its error on the unseen archs is reported per batch size: mean and max |relative
error| and Kendall tau. The segment table is built at each batch size from the same archs and
predicts the same unseen archs, against the same whole-net timings. The unseen archs are then
timed whole a second time: the difference between the two timings is the noise floor no
predictor can beat. Load averages before and after are recorded (timings on a shared machine
are noisy).

    PYTHONPATH=. python bench/bench_latency.py            # compofa_mbv3_tiny and ofa_mbv3_tiny
    PYTHONPATH=. python bench/bench_latency.py --models compofa_mbv3_tiny
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from ofajax import models
from ofajax.search import latency_model
from ofajax.search.latency import LatencyTable

METRICS = ("mean_abs_rel_error", "max_abs_rel_error", "kendall_tau")


def segment_rows(name, model, space, resolution, batch, checks, fit_archs):
  """The segment table at ``batch``, built from the fit and check archs, on the check archs."""
  table = LatencyTable(name, model, resolution, batch)
  t0 = time.perf_counter()
  table.measure(fit_archs + [space.to_host(c["arch"]) for c in checks])
  seconds = time.perf_counter() - t0
  predicted = [table.predict(space.to_host(c["arch"])) for c in checks]
  measured = [c["measured_ms"] for c in checks]
  return dict(latency_model.errors(predicted, measured), build_seconds=seconds,
              segments=len(table.entries))


def bench_model(name, args) -> dict:
  model, space = models.get(name, num_classes=10)
  load = [os.getloadavg()[0]]
  t0 = time.perf_counter()
  lm, report = latency_model.build(name, model, space, args.resolution, args.batches,
                                   args.num_fit, args.num_check, seed=0)
  out = {"model": name, "build_seconds": time.perf_counter() - t0, "fit_archs": report[
      "fit_archs"], "check_archs": report["check_archs"], "weights": lm.weights, "batches": {}}
  fit = [space.to_host(r["arch"]) for r in report["fit"]]
  checks_by_batch = {int(b): r["checks"] for b, r in report["batches"].items()}
  check_archs = [space.to_host(c["arch"]) for c in checks_by_batch[args.batches[0]]]
  again = lm.measure(check_archs)  # a second whole-net timing of the unseen archs
  for b, checks in checks_by_batch.items():
    first = [c["measured_ms"] for c in checks]
    row = {"model": {k: report["batches"][str(b)][k] for k in METRICS},
           "retimed": dict(latency_model.errors(again[b], first)),
           "measured_ms": {"min": min(first), "median": float(np.median(first)),
                           "max": max(first)}}
    if name in args.segments_models:
      row["segments"] = segment_rows(name, model, space, args.resolution, b, checks, fit)
    out["batches"][str(b)] = row
  load.append(os.getloadavg()[0])
  out["load_average_1min"] = load
  return out


def print_rows(results: list[dict]) -> None:
  print(f"{'model':<18} {'batch':>5} {'predictor':<22} {'build s':>7} {'mean err':>8} "
        f"{'max err':>8} {'tau':>5}")
  for r in results:
    for b, row in r["batches"].items():
      sides = [("latency model", row["model"], r["build_seconds"]),
               ("segment table", row.get("segments"), (row.get("segments") or {}).get(
                   "build_seconds")),
               ("re-timing (noise)", row["retimed"], None)]
      for label, m, seconds in sides:
        if m is None:
          continue
        sec = "-" if seconds is None else f"{seconds:.0f}"
        print(f"{r['model']:<18} {b:>5} {label:<22} {sec:>7} "
              f"{100 * m['mean_abs_rel_error']:>7.1f}% {100 * m['max_abs_rel_error']:>7.1f}% "
              f"{m['kendall_tau']:>5.2f}")
    print(f"{'':<18} load average (1 min) before/after: {r['load_average_1min']}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="+", default=["compofa_mbv3_tiny", "ofa_mbv3_tiny"])
  p.add_argument("--segments_models", nargs="*",
                 default=["compofa_mbv3_tiny", "ofa_mbv3_tiny"],
                 help="models to build the per-segment table for too")
  p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
  p.add_argument("--num_fit", type=int, default=32)
  p.add_argument("--num_check", type=int, default=20)
  p.add_argument("--resolution", type=int, default=28)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "latency.json"))
  args = p.parse_args()
  results = []
  for name in args.models:
    results.append(bench_model(name, args))
    print_rows(results[-1:])
  print("\nall models:")
  print_rows(results)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"platform": platform.platform(), "device": str(jax.devices()[0]),
               "cpus": os.cpu_count(), "args": vars(args), "results": results}, f, indent=1)
  print(f"written to {args.out}")


if __name__ == "__main__":
  main()
