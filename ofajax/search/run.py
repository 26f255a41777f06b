"""The search job: ``run_search(config, workdir)`` behind ``python search.py``.

Reads the trained supernet of a training workdir, scores candidate archs with the evaluation
engine (:mod:`ofajax.evaluation`: BN calibration on training batches, top-1 on a validation split
carved from the training data), runs greedy slimming or evolution, and writes under
``<workdir>/search/<name>/``: ``result.json`` (every measured arch, the chosen arch per target,
the Pareto front, the greedy path or evolution history, predictor and latency reports),
``pareto.png``, one exported dense subnet per target under ``subnets/`` (orbax variables,
StableHLO, arch JSON, summary), and a printed table. The test split is only used to report the
chosen archs' top-1, never to choose.

``run_search`` reads top to bottom: build (evaluator, latency table, :class:`Scorer`), check the
targets, run the method, then measure, export and write the results.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from ofajax import cost as cost_lib
from ofajax import evaluation, export, models, reporting
from ofajax.progress import ProgressBar
from ofajax.search import evolution, pareto
from ofajax.search.greedy import greedy_search
from ofajax.search.latency import LatencyTable
from ofajax.search.predictor import fit_and_report
from ofajax.workdir import TrainedSupernet, load_supernet


def run_search(config, workdir: str) -> dict:
  """Runs the search described by ``config`` on the supernet trained in ``workdir``."""
  _check_config(config)
  t_start = time.time()
  sup = load_supernet(workdir, None if config.checkpoint_step < 0 else config.checkpoint_step)
  is_main = jax.process_index() == 0
  out_dir = _output_dir(config, workdir)
  resolution = _resolution(config, sup)
  evaluator = search_evaluator(config, sup, config.valid_split)
  table, latency_report = (_latency(config, sup, out_dir, resolution, is_main)
                           if config.latency.enabled else (None, None))
  scorer = Scorer(sup, evaluator, resolution, table)
  result = _header(config, sup, scorer, latency_report)
  chosen = _run_method(config, scorer, result["targets_macs"], result, is_main)
  rows = _chosen_rows(config, sup, scorer, chosen, out_dir, is_main)
  result.update(_measured(scorer, rows), seconds=round(time.time() - t_start, 1))
  if is_main:
    _write_results(config, result, out_dir, latency=table is not None)
  return result


# --------------------------------------------------------------------------- config


def _check_config(config) -> None:
  if config.method not in ("greedy", "evolution"):
    raise ValueError(f"config.method must be 'greedy' or 'evolution', got {config.method!r}")
  if config.method == "evolution" and config.evolution.fitness not in ("measured", "predictor"):
    raise ValueError("config.evolution.fitness must be 'measured' or 'predictor', got "
                     f"{config.evolution.fitness!r}")
  if not config.target_macs and not config.target_fractions and not (
      config.method == "evolution" and config.evolution.multi_objective):
    raise ValueError("set config.target_macs (absolute MACs) or config.target_fractions (of the "
                     "largest subnet's MACs)")
  if config.max_latency_ms and not config.latency.enabled:
    raise ValueError("config.max_latency_ms needs a latency table: set config.latency.enabled="
                     "True (and config.latency.table to reuse a saved one)")
  if any(not 0 < f <= 1 for f in config.target_fractions):
    raise ValueError(f"config.target_fractions must lie in (0, 1], got {config.target_fractions}")


def _targets(config, largest_macs: int) -> list[float]:
  if config.target_macs:
    return sorted(float(t) for t in config.target_macs)
  return sorted(float(f) * largest_macs for f in config.target_fractions)


def _resolution(config, sup: TrainedSupernet) -> int:
  return int(config.resolution or sup.config.resolution)


def _output_dir(config, workdir: str) -> str:
  """``<workdir>/search/<name>/``, with the search config saved next to its results."""
  out_dir = os.path.join(workdir, "search", config.name)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return out_dir


# --------------------------------------------------------------------------- builders


def search_evaluator(config, sup: TrainedSupernet, split: str) -> evaluation.Evaluator:
  """The engine scoring ``sup``'s archs on ``split`` of its training data set, calibrating BN on
  ``config.calib_batches`` batches of ``config.calib_split`` (seed ``config.seed + 1``). Every
  split is read in batches of ``config.valid_batch_size``: a test split of the validation
  split's shape reuses the compiled score function."""
  train = sup.config
  model = models.with_execution(sup.model, config.engine.get("execution", "masked"))
  return evaluation.make_evaluator(
      model, sup.variables, dataset=train.dataset, data_dir=train.data_dir or None,
      resolution=_resolution(config, sup), calib_split=config.calib_split,
      calib_batch_size=config.calib_batch_size, calib_batches=config.calib_batches,
      seed=config.seed + 1, split=split, batch_size=config.valid_batch_size,
      chunk_size=config.engine.chunk_size, archs_per_call=config.engine.archs_per_call)


class Scorer:
  """Costs and engine scores of archs, each computed once per distinct subnet: searches propose
  the same arch many times, and subnet names are the cache keys.

  ``measured`` maps the name of every arch the engine scored to its record ``{arch, name, macs,
  params, [latency_ms], top1, loss}``: what result.json lists as "evaluated".
  """

  def __init__(self, sup: TrainedSupernet, evaluator: evaluation.Evaluator, resolution: int,
               latency_table: LatencyTable | None = None):
    self.space, self.model = sup.space, sup.model
    self.evaluator, self.resolution, self.latency_table = evaluator, resolution, latency_table
    self._costs: dict[str, dict] = {}
    self.measured: dict[str, dict] = {}

  def cost(self, arch) -> dict:
    """{"macs", "params"} and, with a latency table, its predicted "latency_ms"."""
    name = self.space.name(arch)
    if name not in self._costs:
      # Archs reach here from space.repair or the space itself: already checked on the host.
      c = cost_lib.count(self.model, self.space.to_host(arch), self.resolution, check=False)
      if self.latency_table is not None:
        c["latency_ms"] = self.latency_table.predict(arch)
      self._costs[name] = c
    return dict(self._costs[name])

  def evaluate(self, archs: list[dict]) -> list[dict]:
    """[{"top1", "loss"}] per arch; only archs not measured before reach the engine."""
    space = self.space
    todo = {space.name(a): a for a in archs if space.name(a) not in self.measured}
    if todo:
      for (name, arch), score in zip(todo.items(), self.evaluator(list(todo.values()))):
        self.measured[name] = dict(arch=space.to_host(arch), name=name, **self.cost(arch),
                                   **score)
    return [{k: self.measured[space.name(a)][k] for k in ("top1", "loss")} for a in archs]


def _header(config, sup: TrainedSupernet, scorer: Scorer, latency_report) -> dict:
  """result.json's description of the job, with the MACs targets; raises if the smallest target
  is below the smallest subnet (no method could reach it)."""
  space = sup.space
  largest_macs = scorer.cost(space.to_host(space.largest()))["macs"]
  smallest_macs = scorer.cost(space.to_host(space.smallest()))["macs"]
  targets = _targets(config, largest_macs)
  if targets and targets[0] < smallest_macs:
    raise ValueError(f"MACs target {targets[0]:,.0f} is below the smallest subnet of "
                     f"{sup.model_name} ({smallest_macs:,} MACs at resolution "
                     f"{scorer.resolution}); no arch can reach it: use targets >= "
                     f"{smallest_macs:,}")
  return {"method": config.method, "workdir": os.path.abspath(sup.workdir),
          "checkpoint_step": sup.step, "model": sup.model_name, "resolution": scorer.resolution,
          "largest_macs": largest_macs, "smallest_macs": smallest_macs, "targets_macs": targets,
          "latency": latency_report}


# --------------------------------------------------------------------------- methods


def _run_method(config, scorer: Scorer, targets: list[float], result: dict,
                is_main: bool) -> list[tuple[float, dict]]:
  """[(target, chosen record)], each record measured by the engine; the method's trace (greedy
  path, evolution runs, predictor report) goes into ``result``."""
  if config.method == "greedy":
    return _greedy(config, scorer, targets, result, is_main)
  return _evolution(config, scorer, targets, result, is_main)


def _greedy(config, scorer: Scorer, targets, result: dict, is_main: bool) -> list:
  progress = ProgressBar(None, unit="archs", enabled=is_main)
  out = greedy_search(scorer.space, scorer.evaluate, scorer.cost, targets,
                      config.greedy.granularity, config.greedy.bin_steps, progress)
  progress.close()
  result["path"] = [_public(r) for r in out["path"]]
  return list(out["chosen"].items())


def _evolution(config, scorer: Scorer, targets, result: dict, is_main: bool) -> list:
  """Evolution per target, or one multi-objective run under the largest target whose scored
  archs answer every target."""
  ec = config.evolution
  fitness = _fitness(config, scorer, result, is_main)
  bounds = dict(params=config.max_params or None, latency_ms=config.max_latency_ms or None)
  options = dict(population=ec.population, iterations=ec.iterations, parent_ratio=ec.parent_ratio,
                 mutation_ratio=ec.mutation_ratio, mutation_prob=ec.mutation_prob,
                 multi_objective=ec.multi_objective, seed=config.seed)

  def evolve(macs) -> dict:
    progress = ProgressBar(ec.iterations, unit="iterations", enabled=is_main)
    out = evolution.evolve(scorer.space, fitness, scorer.cost,
                           evolution.Constraints(macs=macs, **bounds), progress=progress,
                           **options)
    progress.close()
    return out

  if ec.multi_objective:
    top = max(targets) if targets else None
    out = evolve(top)
    scorer.evaluate([r["arch"] for r in out["population"]])  # the front is measured
    result["evolution"] = [{"target_macs": top, "history": out["history"]}]
    chosen = evolution.fittest_under(scorer.space, out["seen"], targets)
  else:
    outs = [evolve(t) for t in targets]
    result["evolution"] = [{"target_macs": t, "history": o["history"],
                            "best_fitness": o["best"]["fitness"]} for t, o in zip(targets, outs)]
    chosen = [(t, o["best"]) for t, o in zip(targets, outs)]
  # Chosen archs are always measured by the engine, whatever the fitness was.
  scores = scorer.evaluate([r["arch"] for _, r in chosen])
  return [(t, dict(r, **s)) for (t, r), s in zip(chosen, scores)]


def _fitness(config, scorer: Scorer, result: dict, is_main: bool) -> Callable:
  """Evolution's fitness: the engine's measured top-1, or (``fitness="predictor"``) an accuracy
  predictor fitted on random archs the engine measured (its report goes into ``result``)."""
  measured = lambda archs: [s["top1"] for s in scorer.evaluate(archs)]
  if config.evolution.fitness != "predictor":
    return measured
  pc = config.predictor
  rng = np.random.default_rng(config.seed)
  archs = [scorer.space.random_host(rng) for _ in range(pc.num_archs)]
  if is_main:
    print(f"measuring {len(archs)} random archs to fit the accuracy predictor", flush=True)
  predictor, result["predictor"] = fit_and_report(
      scorer.space, archs, measured(archs), holdout_fraction=pc.holdout_fraction,
      seed=config.seed, hidden=tuple(pc.hidden), steps=pc.steps, learning_rate=pc.learning_rate)
  return lambda archs: list(predictor(archs))


# --------------------------------------------------------------------------- results


def _json_arch(arch) -> dict:
  return {k: np.asarray(v).tolist() for k, v in arch.items()}


def _public(record: dict) -> dict:
  """A record as result.json stores it: the arch as nested lists."""
  out = {k: v for k, v in record.items() if k != "arch"}
  out["arch"] = _json_arch(record["arch"])
  return out


def _chosen_rows(config, sup: TrainedSupernet, scorer: Scorer, chosen: list, out_dir: str,
                 is_main: bool) -> list[dict]:
  """result.json's "chosen": a row per target, with its test top-1 (``config.report_test``)
  and the directory of its exported subnet (``config.export``)."""
  space = sup.space
  test_top1 = _test_top1(config, sup, chosen) if config.report_test and chosen else {}
  rows = []
  for target, record in chosen:
    name = space.name(record["arch"])
    row = dict(_public(record), target_macs=target, name=name, test_top1=test_top1.get(name))
    if config.export and is_main:
      row["export_dir"] = _export(out_dir, f"target_{int(round(target))}", sup,
                                  scorer.evaluator, record, scorer.resolution)
    rows.append(row)
  return rows


def _test_top1(config, sup: TrainedSupernet, chosen: list) -> dict:
  """{name: test top-1} of the chosen archs, calibrated like validation: reported only."""
  split = config.test_split or sup.config.get("test_split", "test")
  scores = search_evaluator(config, sup, split)([r["arch"] for _, r in chosen])
  return {sup.space.name(r["arch"]): s["top1"] for (_, r), s in zip(chosen, scores)}


def _export(out_dir: str, label: str, sup: TrainedSupernet, evaluator: evaluation.Evaluator,
            record: dict, resolution: int) -> str:
  """Writes one chosen subnet: variables (orbax), StableHLO, arch JSON, summary."""
  path = os.path.join(out_dir, "subnets", label)
  os.makedirs(path, exist_ok=True)
  arch = sup.space.validate(record["arch"])
  # BN statistics from the very compiled function that scored the arch: the export scores
  # exactly what the search reported.
  calibrated = evaluator.calibrated_variables(arch)
  dense_model, dense_variables = export.extract_subnet(sup.model, calibrated, arch, sup.space)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(os.path.abspath(path), "variables"), dense_variables, force=True)
  export.save_stablehlo(dense_model, dense_variables, os.path.join(path, "model.stablehlo"),
                        resolution)
  with open(os.path.join(path, "arch.json"), "w") as f:
    f.write(sup.space.to_json(arch))
  summary = {k: v for k, v in record.items() if k != "arch"}
  summary.update(model=sup.model_name, model_options=dict(sup.config.get("model_options", {})),
                 resolution=resolution, name=sup.space.name(arch))
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return path


def _measured(scorer: Scorer, rows: list[dict]) -> dict:
  """result.json's measurements: chosen rows, the Pareto front of everything the engine
  scored, and the engine's counters."""
  evaluated = list(scorer.measured.values())
  front = pareto.front([r["top1"] for r in evaluated], [r["macs"] for r in evaluated])
  ev = scorer.evaluator
  return dict(chosen=rows, front=[_public(evaluated[i]) for i in front],
              evaluated=[_public(r) for r in evaluated],
              engine={"num_evaluated": ev.num_evaluated, "num_calls": ev.num_calls,
                      "chunk_size": ev.chunk_size, "archs_per_call": ev.archs_per_call,
                      "calib_images": int(np.prod(ev.calib_inputs.shape[:2])),
                      "valid_images": ev.num_examples})


def _write_results(config, result: dict, out_dir: str, latency: bool) -> None:
  """result.json, pareto.png and the printed table of the chosen archs."""
  with open(os.path.join(out_dir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  reporting.plot_accuracy_vs_macs(
      os.path.join(out_dir, "pareto.png"),
      f"{config.name} on {result['model']} ({len(result['evaluated'])} archs measured)",
      result["evaluated"], front=result["front"], chosen=result["chosen"],
      targets=result["targets_macs"], ylabel="validation top-1 (%)")
  columns = [("target_macs", "target MACs"), ("top1", "val top-1")]
  columns += [("latency_ms", "lat. ms")] if latency else []
  print(reporting.format_table(result["chosen"], columns + [("test_top1", "test top-1")]))
  print(f"results in {out_dir} ({result['seconds']:.0f} s)")


# --------------------------------------------------------------------------- latency


def _latency(config, sup, out_dir, resolution, is_main):
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
