"""The search job: ``run_search(config, workdir)`` behind ``python search.py``.

Reads the trained supernet of a training workdir, scores candidate archs with the evaluation
engine (:mod:`ofajax.evaluation`: BN calibration on training batches, top-1 on a validation split
carved from the training data *that training never read*: an overlap with the workdir's
``train_split`` is refused), runs greedy slimming or evolution (over archs and, where the
supernet trained at several, input resolutions), and writes under
``<workdir>/search/<name>/``: ``result.json`` (every measured arch, the chosen arch per target,
the Pareto front, the greedy path or evolution history, predictor and latency reports),
``pareto.png``, one exported dense subnet per target under ``subnets/`` (orbax variables,
StableHLO, arch JSON, summary), and a printed table. The test split is only used to report the
chosen archs' top-1, never to choose.

``run_search`` reads top to bottom: check the splits, build (resolutions, latency table,
:class:`Scorer` with an engine per resolution), check the targets, run the method, then
measure, export and write the results.
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
from ofajax import data, evaluation, export, models, reporting
from ofajax.data import splits
from ofajax.progress import ProgressBar
from ofajax.search import evolution, int8, moves, pareto
from ofajax.search.greedy import greedy_search
from ofajax.search import latency_setup
from ofajax.search.predictor import fit_and_report
from ofajax.workdir import TrainedSupernet, load_supernet, model_options, read_config


def run_search(config, workdir: str) -> dict:
  """Runs the search described by ``config`` on the supernet trained in ``workdir``."""
  _check_config(config)
  t_start = time.time()
  # Before the checkpoint is read: a validation split training saw fails in seconds.
  data_splits = scoring_splits(config, read_config(workdir))
  sup = load_supernet(workdir, None if config.checkpoint_step < 0 else config.checkpoint_step)
  is_main = jax.process_index() == 0
  out_dir = _output_dir(config, workdir)
  resolutions = search_resolutions(config, sup.config)
  table, latency_report = (latency_setup.build_or_load(config, sup, out_dir, resolutions[0],
                                                         is_main)
                           if config.latency.enabled else (None, None))
  engine = lambda r: search_evaluator(config, sup, data_splits["valid"], r, data_splits["calib"])
  scorer = Scorer(sup, engine, resolutions, table, config.engine.get("resident_resolutions", 2))
  result = _header(config, sup, scorer, latency_report, data_splits)
  chosen = _run_method(config, scorer, result["targets_macs"], result, is_main)
  chosen = no_cheaper_better(config, scorer, chosen)
  # --config.quantize=int8: re-choose by int8 validation top-1 (ofajax/search/int8.py)
  q8 = int8.Int8Scorer(sup, scorer) if config.get("quantize") else None
  chosen = q8.choose(config, chosen) if q8 else chosen
  rows = _chosen_rows(config, sup, scorer, chosen, out_dir, is_main, data_splits["calib"])
  if q8:
    q8.finish(config, rows, is_main)  # int8 test top-1 and model_int8.stablehlo exports
  if table is not None and config.latency.get("retime_chosen", True):
    latency_setup.retime_chosen(config, sup, table, chosen, rows)
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
    raise ValueError("config.max_latency_ms needs a latency model: set config.latency.enabled="
                     "True (and config.latency.table to reuse a saved one)")
  if config.latency.enabled and config.latency.get("method", "model") not in ("model",
                                                                               "segments"):
    raise ValueError("config.latency.method must be 'model' (whole-net latency model) or "
                     f"'segments' (per-segment table), got {config.latency.method!r}")
  if any(not 0 < f <= 1 for f in config.target_fractions):
    raise ValueError(f"config.target_fractions must lie in (0, 1], got {config.target_fractions}")
  if config.get("quantize") or config.get("qat_steps"):
    int8.check_config(config)


def _targets(config, largest_macs: int) -> list[float]:
  if config.target_macs:
    return sorted(float(t) for t in config.target_macs)
  return sorted(float(f) * largest_macs for f in config.target_fractions)


def _resolution(config, train) -> int:
  """The one resolution of greedy search and of a search without a resolution gene."""
  return int(config.resolution or train.resolution)


def search_resolutions(config, train) -> list[int]:
  """The input resolutions candidates may take, ascending. Evolution: ``config.resolutions``,
  else ``config.resolution`` alone when set, else the resolutions the supernet trained at
  (``train_resolutions``, or its one ``resolution``): OFA searches the image size too. Greedy
  slimming (AutoSlim) keeps one resolution."""
  if config.method == "evolution" and config.get("resolutions"):
    chosen = config.resolutions
  elif config.method == "evolution" and not config.resolution:
    chosen = train.get("train_resolutions") or [train.resolution]
  else:
    chosen = [_resolution(config, train)]
  resolutions = sorted({int(r) for r in chosen})
  if config.latency.enabled and len(resolutions) > 1:
    raise ValueError(f"a latency table is timed at one resolution, and this search offers "
                     f"{resolutions}: set config.resolutions=({resolutions[-1]},) (or another "
                     "single one) with config.latency.enabled")
  return resolutions


def scoring_splits(config, train) -> dict:
  """{"calib", "valid"}: the splits that calibrate BN and score candidates. Refuses a
  validation split that overlaps the training run's ``train_split`` (``train``: the workdir's
  config), naming both. Defaults: BN calibrates on the training split (as training's own
  evaluation does); validation is the slice training held out (:func:`_held_out`)."""
  data_dir = train.get("data_dir") or None
  wanted = [train.train_split] + ([config.valid_split] if config.valid_split else [])
  sizes = splits.split_sizes(train.dataset, wanted, data_dir)
  valid = config.valid_split or _held_out(train, sizes)
  splits.check_disjoint(train.train_split, valid, sizes)
  return {"calib": config.calib_split or train.train_split, "valid": valid}


def _held_out(train, sizes: dict) -> str:
  """The default validation split: the last ``holdout`` examples of the training split's base
  when the training config holds some out, else the tail of it training never read."""
  holdout = int(train.get("holdout", 0) or 0)
  if holdout > 0:
    return splits.holdout_split(train.train_split, holdout)
  tail = splits.unseen_tail(train.train_split, sizes)
  if tail is None:
    raise ValueError(
        f"config.valid_split is empty and the training run read all of {train.train_split!r} "
        f"(its config holds nothing out): no training example is left to validate on. Train "
        f"on e.g. {splits.base_names(train.train_split)[0]}[:-500] with holdout=500, or set "
        "config.valid_split to a split training did not read")
  return tail


def _output_dir(config, workdir: str) -> str:
  """``<workdir>/search/<name>/``, with the search config saved next to its results."""
  out_dir = os.path.join(workdir, "search", config.name)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return out_dir


# --------------------------------------------------------------------------- builders


def search_evaluator(config, sup: TrainedSupernet, split: str, resolution: int | None = None,
                     calib_split: str | None = None) -> evaluation.Evaluator:
  """The engine scoring ``sup``'s archs on ``split`` of its training data set at
  ``resolution`` (default: :func:`_resolution`), calibrating BN on ``config.calib_batches``
  batches of ``calib_split`` (default: ``config.calib_split``, else the training split; seed
  ``config.seed + 1``). Every split is read in batches of ``config.valid_batch_size``: a test
  split of the validation split's shape reuses the compiled score function."""
  train = sup.config
  split = split or scoring_splits(config, train)["valid"]  # "": the held-out default
  model = models.with_execution(sup.model, config.engine.get("execution", "masked"))
  return evaluation.make_evaluator(
      model, sup.variables, dataset=train.dataset, data_dir=train.data_dir or None,
      resolution=resolution or _resolution(config, train),
      calib_split=calib_split or config.calib_split or train.train_split,
      calib_batch_size=config.calib_batch_size, calib_batches=config.calib_batches,
      seed=config.seed + 1, split=split, batch_size=config.valid_batch_size,
      chunk_size=config.engine.chunk_size, archs_per_call=config.engine.archs_per_call,
      tokenizer=train.get("tokenizer") or None)


class Scorer:
  """Costs and engine scores of candidates (an arch at a resolution), each computed once:
  searches propose the same candidate many times, and (subnet name, resolution) is the key.

  ``make_evaluator(resolution)`` builds the engine of one resolution (its calibration and
  validation batches are resized to it). At most ``resident`` of them are kept: each holds the
  validation split on the device, which at ImageNet's 10k images and 25 resolutions would not
  fit; one evicted is rebuilt on demand (the compiled functions are reused).
  ``measured`` maps the key of every candidate the engine scored to its record ``{arch, name,
  resolution, macs, params, [latency_ms], top1, loss}``: what result.json lists as "evaluated".
  """

  def __init__(self, sup: TrainedSupernet, make_evaluator: Callable, resolutions,
               latency_table=None, resident: int = 2):
    self.space, self.model = sup.space, sup.model
    self.make_evaluator, self.resolutions = make_evaluator, list(resolutions)
    self.resolution = self.resolutions[-1]  # the default: greedy's one, the largest otherwise
    self.latency_table, self.resident = latency_table, max(1, resident)
    self._evaluators: dict[int, evaluation.Evaluator] = {}
    self._costs: dict[tuple, dict] = {}
    self.measured: dict[tuple, dict] = {}
    self.num_calls = 0   # compiled engine calls (chunks), over every resolution's engine

  def evaluator(self, resolution: int | None = None) -> evaluation.Evaluator:
    r = resolution or self.resolution
    if r not in self._evaluators:
      while len(self._evaluators) >= self.resident:
        self._evaluators.pop(next(iter(self._evaluators)))  # the oldest
      self._evaluators[r] = self.make_evaluator(r)
    return self._evaluators[r]

  def cost(self, arch, resolution: int | None = None) -> dict:
    """{"macs", "params"} at ``resolution`` and, with a latency model or table
    (``latency_table``: anything with ``predict(arch)``), "latency_ms"."""
    r = resolution or self.resolution
    key = (moves.arch_key(arch), r)
    if key not in self._costs:
      # Archs reach here from space.repair or the space itself: already checked on the host.
      c = cost_lib.count(self.model, self.space.to_host(arch), r, check=False)
      if self.latency_table is not None:
        c["latency_ms"] = self.latency_table.predict(arch)
      self._costs[key] = c
    return dict(self._costs[key])

  def evaluate(self, archs: list[dict], resolutions=None) -> list[dict]:
    """[{"top1", "loss"}] per arch (at its resolution); only candidates not measured before
    reach the engine, one resolution at a time."""
    rs = [r or self.resolution for r in (resolutions or [None] * len(archs))]
    keys = [(self.space.name(a), r) for a, r in zip(archs, rs)]
    todo = {k: a for k, a in zip(keys, archs) if k not in self.measured}
    for r in sorted({k[1] for k in todo}):
      group = [(k[0], a) for k, a in todo.items() if k[1] == r]
      engine = self.evaluator(r)
      before = engine.num_calls
      scores = engine([a for _, a in group])
      self.num_calls += engine.num_calls - before
      for (name, arch), score in zip(group, scores):
        self.measured[(name, r)] = dict(arch=self.space.to_host(arch), name=name, resolution=r,
                                        **self.cost(arch, r), **score)
    return [{k: self.measured[key][k] for k in ("top1", "loss")} for key in keys]

  @property
  def engines(self) -> list[evaluation.Evaluator]:
    return list(self._evaluators.values())


def _header(config, sup: TrainedSupernet, scorer: Scorer, latency_report,
            data_splits: dict) -> dict:
  """result.json's description of the job, with the MACs targets; raises if the smallest target
  is below the smallest subnet at the lowest resolution (no method could reach it)."""
  space = sup.space
  low, high = scorer.resolutions[0], scorer.resolutions[-1]
  largest_macs = scorer.cost(space.to_host(space.largest()), high)["macs"]
  smallest_macs = scorer.cost(space.to_host(space.smallest()), low)["macs"]
  targets = _targets(config, largest_macs)
  if targets and targets[0] < smallest_macs:
    raise ValueError(f"MACs target {targets[0]:,.0f} is below the smallest subnet of "
                     f"{sup.model_name} ({smallest_macs:,} MACs at resolution {low}); no arch "
                     f"can reach it: use targets >= {smallest_macs:,}")
  return {"method": config.method, "workdir": os.path.abspath(sup.workdir),
          "checkpoint_step": sup.step, "model": sup.model_name, "resolution": high,
          "resolutions": scorer.resolutions, "train_split": sup.config.train_split,
          "valid_split": data_splits["valid"], "calib_split": data_splits["calib"],
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
  bounds = pareto.cost_bounds(config)
  out = greedy_search(scorer.space, scorer.evaluate, scorer.cost, targets,
                      config.greedy.granularity, config.greedy.bin_steps, progress, bounds)
  progress.close()
  for record in out["path"]:  # AutoSlim slims at one resolution
    record["resolution"] = scorer.resolution
  result["path"] = [_public(r) for r in out["path"]]
  return list(out["chosen"].items())


def _evolution(config, scorer: Scorer, targets, result: dict, is_main: bool) -> list:
  """Evolution per target, or one multi-objective run under the largest target whose scored
  candidates answer every target."""
  ec = config.evolution
  fitness = _fitness(config, scorer, result, is_main)
  bounds = dict(params=config.max_params or None, latency_ms=config.max_latency_ms or None)
  options = dict(population=ec.population, iterations=ec.iterations, parent_ratio=ec.parent_ratio,
                 mutation_ratio=ec.mutation_ratio, mutation_prob=ec.mutation_prob,
                 resolutions=scorer.resolutions,
                 resolution_mutation_prob=ec.get("resolution_mutation_prob"),
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
    pop = out["population"]
    scorer.evaluate([r["arch"] for r in pop], [r["resolution"] for r in pop])  # the front
    result["evolution"] = [{"target_macs": top, "history": out["history"]}]
    chosen = evolution.fittest_under(scorer.space, out["seen"], targets)
  else:
    outs = [evolve(t) for t in targets]
    result["evolution"] = [{"target_macs": t, "history": o["history"],
                            "best_fitness": o["best"]["fitness"],
                            "best_resolution": o["best"]["resolution"]}
                           for t, o in zip(targets, outs)]
    chosen = [(t, o["best"]) for t, o in zip(targets, outs)]
  # Chosen candidates are always measured by the engine, whatever the fitness was.
  scores = scorer.evaluate([r["arch"] for _, r in chosen], [r["resolution"] for _, r in chosen])
  return [(t, dict(r, **s)) for (t, r), s in zip(chosen, scores)]


def no_cheaper_better(config, scorer: Scorer, chosen: list) -> list[tuple[float, dict]]:
  """Each chosen record, unless an arch of no more MACs that the engine scored (within the
  params / latency bounds) has a higher validation top-1: then the best such arch, cheapest
  on ties, marked ``"replaces"``. The smallest arch is always scored first, so a user asking
  for a budget never gets a subnet worse on validation than one half its size."""
  smallest = scorer.space.smallest()
  scorer.evaluate([smallest], [min(scorer.resolutions)])

  measured = [r for r in scorer.measured.values() if pareto.within_bounds(config, r)]
  out = []
  for target, record in chosen:
    cheaper = [r for r in measured if r["macs"] <= record["macs"]]
    best = max(cheaper, key=lambda r: (r["top1"], -r["macs"]), default=record)
    if best["top1"] > record["top1"]:
      record = dict(best, replaces={"name": scorer.space.name(record["arch"]),
                                    "macs": record["macs"], "top1": record["top1"]})
    out.append((target, record))
  return out


def _fitness(config, scorer: Scorer, result: dict, is_main: bool) -> Callable:
  """Evolution's fitness ``(archs, resolutions) -> [top-1]``: the engine's measured top-1, or
  (``fitness="predictor"``) an accuracy predictor fitted on ``predictor.num_archs`` random
  candidates the engine measured (its report goes into ``result``)."""
  measured = lambda archs, rs: [s["top1"] for s in scorer.evaluate(archs, rs)]
  if config.evolution.fitness != "predictor":
    return measured
  pc = config.predictor
  rng = np.random.default_rng(config.seed)
  archs = [scorer.space.random_host(rng) for _ in range(pc.num_archs)]
  choices = scorer.resolutions
  # a random resolution per arch (OFA measures its archs at several image sizes)
  rs = ([choices[i] for i in rng.integers(len(choices), size=len(archs))] if len(choices) > 1
        else [choices[0]] * len(archs))
  if is_main:
    at = f" at resolutions {choices}" if len(choices) > 1 else ""
    print(f"measuring {len(archs)} random archs{at} to fit the accuracy predictor", flush=True)
  predictor, result["predictor"] = fit_and_report(
      scorer.space, archs, measured(archs, rs), holdout_fraction=pc.holdout_fraction,
      seed=config.seed, hidden=tuple(pc.hidden), resolutions=rs, choices=choices,
      steps=pc.steps, learning_rate=pc.learning_rate)
  return lambda archs, rs: list(predictor(archs, rs))


# --------------------------------------------------------------------------- results


def _json_arch(arch) -> dict:
  return {k: np.asarray(v).tolist() for k, v in arch.items()}


def _public(record: dict) -> dict:
  """A record as result.json stores it: the arch as nested lists."""
  out = {k: v for k, v in record.items() if k != "arch"}
  out["arch"] = _json_arch(record["arch"])
  return out


def _chosen_rows(config, sup: TrainedSupernet, scorer: Scorer, chosen: list, out_dir: str,
                 is_main: bool, calib_split: str) -> list[dict]:
  """result.json's "chosen": a row per target, with its test top-1 (``config.report_test``)
  and the directory of its exported subnet (``config.export``)."""
  space = sup.space
  test_top1 = (_test_top1(config, sup, chosen, calib_split) if config.report_test and chosen
               else {})
  rows = []
  for target, record in chosen:
    name = space.name(record["arch"])
    row = dict(_public(record), target_macs=target, name=name,
               test_top1=test_top1.get((name, record["resolution"])))
    if config.export and is_main:
      row["export_dir"] = _export(out_dir, f"target_{int(round(target))}", sup,
                                  scorer.evaluator(record["resolution"]), record,
                                  record["resolution"])
    rows.append(row)
  return rows


def _test_top1(config, sup: TrainedSupernet, chosen: list, calib_split: str) -> dict:
  """{(name, resolution): test top-1} of the chosen candidates, calibrated like validation:
  reported only."""
  split = config.test_split or sup.config.get("test_split", "test")
  out = {}
  for r in sorted({rec["resolution"] for _, rec in chosen}):
    archs = [rec["arch"] for _, rec in chosen if rec["resolution"] == r]
    scores = search_evaluator(config, sup, split, r, calib_split)(archs)
    out.update({(sup.space.name(a), r): s["top1"] for a, s in zip(archs, scores)})
  return out


def _export(out_dir: str, label: str, sup: TrainedSupernet, evaluator: evaluation.Evaluator,
            record: dict, resolution: int) -> str:
  """Writes one chosen subnet: variables (orbax), StableHLO at its resolution, arch JSON,
  summary."""
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
  summary.update(model=sup.model_name, model_options=model_options(sup.config),
                 resolution=resolution, name=sup.space.name(arch),
                 # what the engine fed the model, so serve.py can rebuild it from an image
                 input=data.eval_input(sup.config.dataset, resolution))
  with open(os.path.join(path, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return path


def _measured(scorer: Scorer, rows: list[dict]) -> dict:
  """result.json's measurements: chosen rows, the Pareto front of everything the engine
  scored, and the engine's counters (summed over the resolutions' engines kept)."""
  evaluated = list(scorer.measured.values())
  front = pareto.front([r["top1"] for r in evaluated], [r["macs"] for r in evaluated])
  engines = scorer.engines
  ev = engines[-1] if engines else scorer.evaluator()
  return dict(chosen=rows, front=[_public(evaluated[i]) for i in front],
              evaluated=[_public(r) for r in evaluated],
              engine={"num_evaluated": len(evaluated),
                      "num_calls": scorer.num_calls,
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
  columns += ([("latency_ms", "pred. ms"), ("measured_latency_ms", "meas. ms")] if latency
              else [])
  columns += [("test_top1", "test top-1")]
  if config.get("quantize"):
    columns += [("int8_top1", "int8 val")]
    columns += [("int8_qat_top1", "int8 val after QAT")] if config.get("qat_steps") else []
    columns += [("int8_test_top1", "int8 test")]
  print(reporting.format_table(result["chosen"], columns))
  print(f"results in {out_dir} ({result['seconds']:.0f} s)")
