"""The search job: ``run_search(config, workdir)`` behind ``python search.py``.

Reads the trained supernet of a training workdir, scores candidate archs with the batched
engine (BN calibration on training batches, top-1 on a validation split carved from the training
data), runs greedy slimming or evolution, and writes under ``<workdir>/search/<name>/``:
``result.json`` (every measured arch, the chosen arch per target, the Pareto front, the greedy
path or evolution history, predictor and latency reports), ``pareto.png``, one exported dense
subnet per target under ``subnets/`` (orbax variables, StableHLO, arch JSON, summary), and a
printed table. The test split is only used to report the chosen archs' top-1, never to choose.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from ofajax import cost as cost_lib
from ofajax import export
from ofajax.progress import ProgressBar
from ofajax.search import evolution, moves, pareto
from ofajax.search.engine import Evaluator, SearchData, eval_arrays, load_search_data
from ofajax.search.greedy import greedy_search
from ofajax.search.latency import LatencyTable
from ofajax.search.predictor import fit_and_report
from ofajax.search.supernet import load_supernet


def _json_arch(arch) -> dict:
  return {k: np.asarray(v).tolist() for k, v in arch.items()}


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


def _export(out_dir: str, label: str, sup, evaluator: Evaluator, record: dict,
            resolution: int) -> str:
  """Writes one chosen subnet: variables (orbax), StableHLO, arch JSON, summary."""
  path = os.path.join(out_dir, "subnets", label)
  os.makedirs(path, exist_ok=True)
  arch = sup.space.validate(record["arch"])
  calibrated = evaluator.calibrated_variables(arch)
  dense_model, dense_variables = export.extract_subnet(sup.model, calibrated, arch, sup.space)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(os.path.abspath(path), "variables"), dense_variables, force=True)
  export.save_stablehlo(dense_model, dense_variables, os.path.join(path, "model.stablehlo"),
                        resolution, int(getattr(sup.model, "in_channels", 3)))
  with open(os.path.join(path, "arch.json"), "w") as f:
    f.write(sup.space.to_json(arch))
  summary = {k: v for k, v in record.items() if k != "arch"}
  summary.update(model=sup.model_name, model_options=dict(sup.config.get("model_options", {})),
                 resolution=resolution, name=sup.space.name(arch))
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return path


def format_table(rows: list[dict], latency: bool) -> str:
  head = f"{'target MACs':>12}  {'MACs':>12}  {'params':>10}  "
  head += f"{'lat. ms':>8}  " if latency else ""
  head += f"{'val top-1':>9}  {'test top-1':>10}  arch"
  lines = [head]
  for r in rows:
    line = f"{r['target_macs']:>12,.0f}  {r['macs']:>12,}  {r['params']:>10,}  "
    if latency:
      line += f"{r.get('latency_ms', float('nan')):>8.3f}  "
    test = f"{100 * r['test_top1']:>9.2f}%" if r.get("test_top1") is not None else f"{'-':>10}"
    line += f"{100 * r['top1']:>8.2f}%  {test}  {r['name']}"
    lines.append(line)
  return "\n".join(lines)


def plot_front(evaluated: list[dict], front: list[dict], chosen: list[dict], targets, path: str,
               title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
  ax.scatter([r["macs"] / 1e6 for r in evaluated], [100 * r["top1"] for r in evaluated], s=8,
             color="tab:gray", alpha=0.5, label=f"evaluated ({len(evaluated)})")
  ax.plot([r["macs"] / 1e6 for r in front], [100 * r["top1"] for r in front], "-o", ms=3,
          color="tab:red", label="Pareto front")
  ax.scatter([r["macs"] / 1e6 for r in chosen], [100 * r["top1"] for r in chosen], marker="*",
             s=120, color="tab:blue", zorder=3, label="chosen")
  for t in targets:
    ax.axvline(t / 1e6, color="tab:blue", ls=":", lw=0.8)
  ax.set_xlabel("MACs (M)")
  ax.set_ylabel("validation top-1 (%)")
  ax.set_title(title)
  ax.legend(loc="lower right", fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _test_data(sup, config, valid: SearchData) -> SearchData:
  """The training config's test split with the validation set's calibration batches; shaped
  like the validation set when sizes allow (then the engine's compiled function is reused)."""
  split = config.test_split or sup.config.get("test_split", "test")
  resolution = int(config.resolution or sup.config.resolution)
  return SearchData(valid.calib_images, *eval_arrays(
      sup.config.dataset, split, sup.config.data_dir or None, config.valid_batch_size,
      resolution, getattr(sup.model, "vocab_size", None)))


def run_search(config, workdir: str) -> dict:
  """Runs the search described by ``config`` on the supernet trained in ``workdir``."""
  _check_config(config)
  t_start = time.time()
  sup = load_supernet(workdir, None if config.checkpoint_step < 0 else config.checkpoint_step)
  is_main = jax.process_index() == 0
  out_dir = os.path.join(workdir, "search", config.name)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  resolution = int(config.resolution or sup.config.resolution)
  space, model = sup.space, sup.model
  search_data = load_search_data(sup.config, config, getattr(model, "vocab_size", None))
  evaluator = Evaluator(model, sup.variables, search_data, config.engine.chunk_size,
                        config.engine.archs_per_call)

  table = None
  latency_report = None
  if config.latency.enabled:
    table, latency_report = _latency(config, sup, out_dir, resolution, is_main)

  cost_cache: dict[str, dict] = {}

  def cost(arch) -> dict:
    name = space.name(arch)
    if name not in cost_cache:
      # Archs reach here from moves.finish or the space itself: already checked on the host.
      c = cost_lib.count(model, {k: np.asarray(v) for k, v in arch.items()}, resolution,
                         check=False)
      if table is not None:
        c["latency_ms"] = table.predict(arch)
      cost_cache[name] = c
    return dict(cost_cache[name])

  largest_macs = cost(moves.to_host(space.largest()))["macs"]
  targets = _targets(config, largest_macs)
  smallest_macs = cost(moves.to_host(space.smallest()))["macs"]
  if targets and targets[0] < smallest_macs:
    raise ValueError(f"MACs target {targets[0]:,.0f} is below the smallest subnet of "
                     f"{sup.model_name} ({smallest_macs:,} MACs at resolution {resolution}); "
                     f"no arch can reach it: use targets >= {smallest_macs:,}")

  measured: dict[str, dict] = {}

  def evaluate(archs: list[dict]) -> list[dict]:
    """Engine scores, cached by subnet name (a search may propose an arch twice)."""
    todo = {space.name(a): a for a in archs if space.name(a) not in measured}
    if todo:
      for (name, arch), score in zip(todo.items(), evaluator(list(todo.values()))):
        measured[name] = dict(arch=moves.to_host(arch), name=name, **cost(arch), **score)
    return [{k: measured[space.name(a)][k] for k in ("top1", "loss")} for a in archs]

  result: dict = {"method": config.method, "workdir": os.path.abspath(workdir),
                  "checkpoint_step": sup.step, "model": sup.model_name, "resolution": resolution,
                  "largest_macs": largest_macs, "smallest_macs": smallest_macs,
                  "targets_macs": targets, "latency": latency_report}
  chosen_records: list[tuple[float, dict]] = []
  if config.method == "greedy":
    progress = ProgressBar(None, unit="archs", enabled=is_main)
    out = greedy_search(space, evaluate, cost, targets, config.greedy.granularity,
                        config.greedy.bin_steps, progress)
    result["path"] = [_public(r) for r in out["path"]]
    chosen_records = list(out["chosen"].items())
    progress.close()
  else:
    chosen_records = _evolution(config, space, evaluate, cost, targets, result, is_main)

  evaluated = list(measured.values())
  front_idx = pareto.front([r["top1"] for r in evaluated], [r["macs"] for r in evaluated])
  front = [evaluated[i] for i in front_idx]
  test_top1 = {}
  if config.report_test and chosen_records:
    test = _test_data(sup, config, search_data)
    test_eval = Evaluator(model, sup.variables, test, config.engine.chunk_size,
                          config.engine.archs_per_call)
    scores = test_eval([r["arch"] for _, r in chosen_records])
    test_top1 = {space.name(r["arch"]): s["top1"] for (_, r), s in zip(chosen_records, scores)}
  rows = []
  for target, record in chosen_records:
    row = dict(_public(record), target_macs=target, name=space.name(record["arch"]),
               test_top1=test_top1.get(space.name(record["arch"])))
    if config.export and is_main:
      label = f"target_{int(round(target))}"
      row["export_dir"] = _export(out_dir, label, sup, evaluator, record, resolution)
    rows.append(row)

  result.update(
      chosen=rows, front=[_public(r) for r in front],
      evaluated=[_public(r) for r in evaluated],
      engine={"num_evaluated": evaluator.num_evaluated, "num_calls": evaluator.num_calls,
              "chunk_size": evaluator.chunk_size, "archs_per_call": evaluator.archs_per_call,
              "calib_images": int(np.prod(search_data.calib_images.shape[:2])),
              "valid_images": search_data.num_valid},
      seconds=round(time.time() - t_start, 1))
  if is_main:
    with open(os.path.join(out_dir, "result.json"), "w") as f:
      json.dump(result, f, indent=1)
    plot_front(evaluated, front, [r for _, r in chosen_records], targets,
               os.path.join(out_dir, "pareto.png"),
               f"{config.name} on {sup.model_name} ({len(evaluated)} archs measured)")
    print(format_table(rows, table is not None))
    print(f"results in {out_dir} ({result['seconds']:.0f} s)")
  return result


def _public(record: dict) -> dict:
  out = {k: v for k, v in record.items() if k != "arch"}
  out["arch"] = _json_arch(record["arch"])
  return out


def _evolution(config, space, evaluate, cost, targets, result, is_main) -> list:
  """Runs evolution per target (or once, multi-objective); returns [(target, record)]."""
  ec = config.evolution
  measured_fitness = lambda archs: [s["top1"] for s in evaluate(archs)]
  fitness = measured_fitness
  if ec.fitness == "predictor":
    rng = np.random.default_rng(config.seed)
    archs = [moves.random_arch(space, rng) for _ in range(config.predictor.num_archs)]
    if is_main:
      print(f"measuring {len(archs)} random archs to fit the accuracy predictor", flush=True)
    accs = measured_fitness(archs)
    predictor, report = fit_and_report(
        space, archs, accs, holdout_fraction=config.predictor.holdout_fraction, seed=config.seed,
        hidden=tuple(config.predictor.hidden), steps=config.predictor.steps,
        learning_rate=config.predictor.learning_rate)
    result["predictor"] = report
    fitness = lambda archs: list(predictor(archs))
  bounds = dict(params=config.max_params or None, latency_ms=config.max_latency_ms or None)
  options = dict(population=ec.population, iterations=ec.iterations, parent_ratio=ec.parent_ratio,
                 mutation_ratio=ec.mutation_ratio, mutation_prob=ec.mutation_prob,
                 seed=config.seed)
  runs = []
  if ec.multi_objective:
    top = max(targets) if targets else None
    progress = ProgressBar(ec.iterations, unit="iterations", enabled=is_main)
    out = evolution.evolve(space, fitness, cost, evolution.Constraints(macs=top, **bounds),
                           multi_objective=True, progress=progress, **options)
    progress.close()
    population = out["population"]
    evaluate([r["arch"] for r in population])   # measure the final population: the front
    runs.append({"target_macs": top, "history": out["history"]})
    chosen = []
    for t in targets:  # the fittest arch under each target among all the run scored
      ok = [r for r in out["seen"] if r["macs"] <= t]
      chosen.append((t, max(ok, key=lambda r: (r["fitness"], -r["macs"]))))
  else:
    chosen = []
    for t in targets:
      progress = ProgressBar(ec.iterations, unit="iterations", enabled=is_main)
      out = evolution.evolve(space, fitness, cost, evolution.Constraints(macs=t, **bounds),
                             progress=progress, **options)
      progress.close()
      runs.append({"target_macs": t, "history": out["history"],
                   "best_fitness": out["best"]["fitness"]})
      chosen.append((t, out["best"]))
  result["evolution"] = runs
  # Chosen archs are always measured by the engine, whatever the fitness was.
  scores = evaluate([r["arch"] for _, r in chosen])
  return [(t, dict(r, **s)) for (t, r), s in zip(chosen, scores)]


def _latency(config, sup, out_dir, resolution, is_main):
  lc = config.latency
  if lc.table:
    table = LatencyTable.load(lc.table, sup.model_name, sup.model, resolution, lc.batch_size)
    return table, {"table": lc.table, "loaded": True, "entries": len(table.entries)}
  table = LatencyTable(sup.model_name, sup.model, resolution, lc.batch_size, lc.warmup, lc.repeats)
  rng = np.random.default_rng(config.seed + 7)
  space = sup.space
  build = [moves.to_host(space.largest()), moves.to_host(space.smallest())]
  build += [moves.random_arch(space, rng) for _ in range(lc.num_table_archs)]
  progress = ProgressBar(None, unit="segments", enabled=is_main)
  table.measure(build, progress)
  progress.close()
  path = os.path.join(out_dir, "latency_table.json")
  table.save(path)
  # Prediction error on archs the table was not built from (their segments may be new: timed).
  checks = []
  for _ in range(lc.num_check_archs):
    arch = moves.random_arch(space, rng)
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
