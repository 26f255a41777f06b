"""The latency side of a search job: build or load the latency predictor (the whole-net model,
or OFA's per-segment table) for ``config.latency``, and re-time the chosen subnets whole."""

from __future__ import annotations

import os

import numpy as np

from ofajax.progress import ProgressBar
from ofajax.search import latency_model
from ofajax.search.latency import LatencyTable


def build_or_load(config, sup, out_dir, resolution, is_main):
  """(predictor, report): the whole-net latency model (``config.latency.method="model"``) or
  the per-segment table ("segments"), loaded from ``config.latency.table`` or built here."""
  if config.latency.get("method", "model") == "segments":
    return _latency_table(config, sup, out_dir, resolution, is_main)
  lc = config.latency
  batches = latency_batches(lc)
  if lc.table:
    lm = latency_model.LatencyModel.load(lc.table, sup.model_name, sup.model, resolution,
                                         batches)
    return lm, {"method": "model", "file": lc.table, "loaded": True}
  if is_main:
    print(f"timing {lc.num_fit_archs + lc.num_check_archs} whole subnets at batch "
          f"{' and '.join(map(str, batches))} for the latency model", flush=True)
  lm, report = latency_model.build(
      sup.model_name, sup.model, sup.space, resolution, batches, lc.num_fit_archs,
      lc.num_check_archs, config.seed + 7, warmup=lc.warmup, seconds=lc.seconds,
      rounds=lc.rounds)
  path = os.path.join(out_dir, "latency_model.json")
  lm.save(path, report)
  if is_main:
    for b, r in report["batches"].items():
      if r.get("checks"):
        print(f"latency model, batch {b}: on {len(r['checks'])} unseen archs mean |error| "
              f"{100 * r['mean_abs_rel_error']:.1f}%, max {100 * r['max_abs_rel_error']:.1f}%, "
              f"Kendall tau {r['kendall_tau']:.2f} (built in {report['build_seconds']:.0f} s)")
  # result.json keeps the report; the fit archs and their timings stay in the model's file
  return lm, dict({k: v for k, v in report.items() if k != "fit"}, file=path, loaded=False)


def latency_batches(lc) -> tuple[int, ...]:
  """The batch sizes a latency model is fitted at: ``batch_size`` (what ``latency_ms`` and
  ``max_latency_ms`` mean) first, then ``serving_batch_size`` when set and different."""
  serving = int(lc.get("serving_batch_size", 0) or 0)
  return (int(lc.batch_size),) + ((serving,) if serving and serving != lc.batch_size else ())


def retime_chosen(config, sup, predictor, chosen: list, rows: list[dict]) -> None:
  """Times each chosen subnet whole on this device, at the latency model's batch sizes (the
  table's one), and adds to its row ``latency``: {batch: {predicted_ms, measured_ms}}, and
  ``measured_latency_ms`` at ``config.latency.batch_size`` (``latency_ms`` is predicted)."""
  lc = config.latency
  is_model = isinstance(predictor, latency_model.LatencyModel)
  batches = predictor.batch_sizes if is_model else (predictor.batch_size,)
  predict = predictor.predict if is_model else lambda arch, b: predictor.predict(arch)
  archs = [record["arch"] for _, record in chosen]
  timer = latency_model.LatencyModel(sup.model_name, sup.model, predictor.resolution, batches,
                                     lc.warmup, lc.seconds, lc.rounds)
  measured = timer.measure(archs)
  for i, (arch, row) in enumerate(zip(archs, rows)):
    row["latency"] = {str(b): {"predicted_ms": predict(arch, b), "measured_ms": measured[b][i]}
                      for b in batches}
    row["measured_latency_ms"] = measured[batches[0]][i]


def _latency_table(config, sup, out_dir, resolution, is_main):
  lc = config.latency
  if lc.table:
    table = LatencyTable.load(lc.table, sup.model_name, sup.model, resolution, lc.batch_size)
    return table, {"table": lc.table, "loaded": True, "entries": len(table.entries)}
  table = LatencyTable(sup.model_name, sup.model, resolution, lc.batch_size, lc.warmup, lc.repeats)
  rng = np.random.default_rng(config.seed + 7)
  space = sup.space
  build = [space.to_host(space.largest()), space.to_host(space.smallest())]
  build += [space.random_host(rng) for _ in range(lc.num_table_archs)]
  progress = ProgressBar(None, unit="segments", enabled=is_main)
  table.measure(build, progress)
  progress.close()
  path = os.path.join(out_dir, "latency_table.json")
  table.save(path)
  # Prediction error on archs the table was not built from (their segments may be new: timed).
  checks = []
  for _ in range(lc.num_check_archs):
    arch = space.random_host(rng)
    table.measure([arch])
    checks.append({"name": space.name(arch), "predicted_ms": table.predict(arch),
                   "measured_ms": table.measure_direct(arch)})
  table.save(path)
  errors = [abs(c["predicted_ms"] - c["measured_ms"]) / c["measured_ms"] for c in checks]
  report = {"table": path, "loaded": False, "entries": len(table.entries),
            "overhead_ms": table.overhead_ms, "batch_size": lc.batch_size, "checks": checks,
            "mean_abs_rel_error": float(np.mean(errors)) if errors else None,
            "max_abs_rel_error": float(np.max(errors)) if errors else None}
  if is_main and errors:
    print(f"latency table: {len(table.entries)} segments; prediction error on "
          f"{len(errors)} unseen archs: mean {100 * report['mean_abs_rel_error']:.1f}%, "
          f"max {100 * report['max_abs_rel_error']:.1f}%")
  return table, report
