"""int8 choice, reporting and export of a search's subnets (``search.py --config.quantize=int8``).

The engine scores thousands of archs in one compiled masked supernet, in float32. An int8
score needs the arch's own dense subnet, quantized (:mod:`ofajax.quantize`) and compiled: seconds
per arch, too slow for every candidate. So the search runs in float as usual, then for each
target :class:`Int8Scorer` re-scores a short list by real int8 top-1 on the same validation
split: the ``config.quantize_candidates`` best archs (by float validation top-1) that the engine
measured within the target's budget (MACs, and params / latency bounds where set), the float
choice, and those scored for smaller targets that fit. The best of them by int8 validation top-1
(fewer MACs on ties) is chosen. Each
int8 model takes its BN statistics from the engine's calibration of that arch (what the float
score used) and its activation ranges from the engine's calibration batches (training data).

With ``config.qat_steps`` > 0, each chosen subnet's int8 model is then fine-tuned with
quantization in the loop (:func:`ofajax.qat.finetune`: ``qat_steps`` Adam steps at
``qat_learning_rate`` on augmented training batches of ``qat_batch_size``, against the labels or,
with ``qat_loss="float_teacher"``, against the float subnet's outputs); its validation top-1
before and after is reported, and the fine-tuned model is what is tested and exported.

For the chosen subnets it then measures int8 test top-1 (reported only, as for float) and writes
``model_int8.stablehlo`` next to the float ``model.stablehlo`` of each export, with an
``"int8"`` entry in its ``summary.json``: ``serve.py <export dir>/model_int8.stablehlo`` serves it.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from ofajax import data, evaluation, export, qat, quantize
from ofajax.search import pareto

MODES = ("", "int8")
QAT_LOSSES = ("labels", "float_teacher")
ARTIFACT = "model_int8.stablehlo"


def check_config(config) -> None:
  if config.quantize not in MODES:
    raise ValueError(f"config.quantize must be '' (float only) or 'int8', got "
                     f"{config.quantize!r}")
  if config.quantize and config.quantize_candidates < 1:
    raise ValueError("config.quantize_candidates (archs re-scored in int8 per target) must be "
                     f">= 1, got {config.quantize_candidates}")
  steps = config.get("qat_steps", 0)
  if steps and not config.quantize:
    raise ValueError("config.qat_steps fine-tunes int8 subnets: set config.quantize=int8 too")
  if steps < 0 or (steps and (config.qat_batch_size < 1 or not config.qat_learning_rate > 0)):
    raise ValueError(f"QAT needs qat_steps >= 0, qat_batch_size >= 1 and qat_learning_rate > 0; "
                     f"got {steps}, {config.qat_batch_size}, {config.qat_learning_rate}")
  if steps and config.qat_loss not in QAT_LOSSES:
    raise ValueError(f"config.qat_loss must be one of {QAT_LOSSES}, got {config.qat_loss!r}")


def top1(logits_fn, batches) -> float:
  """Top-1 of ``logits_fn`` over ``{"inputs", "label", "mask"}`` batches (padding masked)."""
  correct = total = 0
  for b in batches:
    pred = np.argmax(np.asarray(logits_fn(jnp.asarray(b["inputs"]))), -1)
    real = np.asarray(b["mask"]) > 0
    correct += int(np.sum((pred == np.asarray(b["label"])) & real))
    total += int(np.sum(real))
  return correct / total


class Int8Scorer:
  """int8 models of a search's candidates and their validation top-1, each built once.
  ``scorer``: the search's :class:`ofajax.search.run.Scorer` (its engines give the BN
  statistics, calibration batches and validation batches)."""

  def __init__(self, sup, scorer):
    self.sup, self.scorer = sup, scorer
    self._models: dict[tuple, quantize.Int8Model] = {}   # (name, resolution) -> int8 model
    self.valid_top1: dict[tuple, float] = {}

  def _key(self, record) -> tuple:
    return self.sup.space.name(record["arch"]), record["resolution"]

  def model(self, record) -> quantize.Int8Model:
    """The int8 model of a measured candidate ``record``."""
    key = self._key(record)
    if key not in self._models:
      engine = self.scorer.evaluator(record["resolution"])
      self._models[key] = quantize.quantize(*self._float_subnet(record), engine.calib_inputs)
    return self._models[key]

  def score(self, record) -> float:
    """int8 top-1 of ``record`` on the engine's validation batches."""
    key = self._key(record)
    if key not in self.valid_top1:
      engine = self.scorer.evaluator(record["resolution"])
      self.valid_top1[key] = top1(self.model(record).logits_fn, engine.batches())
    return self.valid_top1[key]

  def choose(self, config, chosen: list) -> list[tuple[float, dict]]:
    """``chosen`` [(target, record)] re-chosen by int8 validation top-1 (module docstring);
    each record gains ``int8_top1`` and ``int8_candidates`` (what was compared)."""
    out, seen = [], {}   # seen: every candidate scored in int8 so far, by key
    for target, record in sorted(chosen, key=lambda tr: tr[0]):
      budget = max(target, record["macs"])
      ok = lambda r: r["macs"] <= budget and pareto.within_bounds(config, r)
      best_float = sorted((r for r in self.scorer.measured.values() if ok(r)),
                          key=lambda r: (-r["top1"], r["macs"]))[:config.quantize_candidates]
      # Candidates scored for a smaller target stay in the running: a larger budget never
      # gets a subnet that is worse in int8 than a smaller budget's.
      pool = {self._key(r): r for r in best_float + [record]
              + [r for r in seen.values() if ok(r)]}
      seen.update(pool)
      scored = [(self.score(r), r) for r in pool.values()]
      int8_top1, best = max(scored, key=lambda s: (s[0], -s[1]["macs"]))
      compared = [{"name": self._key(r)[0], "resolution": r["resolution"], "macs": r["macs"],
                   "top1": r["top1"], "int8_top1": s} for s, r in scored]
      new = dict(best, int8_top1=int8_top1, int8_candidates=compared)
      if self._key(best) != self._key(record):
        new["float_choice"] = {"name": self._key(record)[0], "top1": record["top1"],
                               "int8_top1": self.score(record)}
      out.append((target, new))
    return out

  def finish(self, config, rows: list[dict], is_main: bool) -> None:
    """Adds int8 test top-1 to result.json's chosen ``rows`` and writes the int8 artifact of
    each exported one."""
    train = self.sup.config
    split = config.test_split or train.get("test_split", "test")
    for row in rows:
      qmodel = self.model(row)
      if config.get("qat_steps", 0):
        qmodel, row["int8_qat"] = self.finetuned(config, row, qmodel)
        row["int8_qat_top1"] = row["int8_qat"]["val_top1"]
      if config.report_test:
        _, batches = evaluation.eval_batches(train.dataset, split, train.data_dir or None,
                                             config.valid_batch_size, row["resolution"])
        row["int8_test_top1"] = top1(qmodel.logits_fn, batches)
      if row.get("export_dir") and is_main:
        row["int8_export"] = write_artifact(qmodel, row, row["export_dir"])

  def finetuned(self, config, row: dict, qmodel) -> tuple[quantize.Int8Model, dict]:
    """``qmodel`` after ``config.qat_steps`` of QAT (module docstring), and what to report."""
    train = self.sup.config
    source = data.load(train.dataset, train.train_split, train.data_dir or None,
                       train.get("tokenizer") or None)
    batches = data.make_train_iterator(
        source, batch_size=config.qat_batch_size, seed=config.seed + 2,
        resolution=row["resolution"], augment=train.get("augment", "none"),
        dataset=train.dataset, vocab_size=qmodel.input_spec.vocab_size or None)
    teacher = None
    if config.qat_loss == "float_teacher":
      dense, variables = self._float_subnet(row)
      teacher = lambda x: dense.apply(variables, x, train=False)
    tuned, losses = qat.finetune(qmodel, batches, steps=config.qat_steps,
                                 learning_rate=config.qat_learning_rate, teacher=teacher)
    engine = self.scorer.evaluator(row["resolution"])
    report = {"steps": config.qat_steps, "learning_rate": config.qat_learning_rate,
              "batch_size": config.qat_batch_size, "loss": config.qat_loss,
              "first_loss": losses[0], "last_loss": losses[-1],
              "val_top1_before": self.score(row), "val_top1": top1(tuned.logits_fn,
                                                                  engine.batches())}
    return tuned, report

  def _float_subnet(self, record):
    engine = self.scorer.evaluator(record["resolution"])
    arch = self.sup.space.validate(record["arch"])
    return export.extract_subnet(self.sup.model, engine.calibrated_variables(arch), arch,
                                 self.sup.space)


def write_artifact(qmodel, row: dict, export_dir: str) -> str:
  """``<export_dir>/model_int8.stablehlo``, recorded in the export's summary.json."""
  path = os.path.join(export_dir, ARTIFACT)
  quantize.save_stablehlo(qmodel, path, row["resolution"])
  summary_path = os.path.join(export_dir, "summary.json")
  with open(summary_path) as f:
    summary = json.load(f)
  summary["int8"] = {"artifact": ARTIFACT, "bytes": os.path.getsize(path),
                     "float_bytes": os.path.getsize(os.path.join(export_dir, "model.stablehlo")),
                     "activations": "static", "depthwise": "float",
                     "val_top1": row.get("int8_top1"),
                     "test_top1": row.get("int8_test_top1"), "qat": row.get("int8_qat")}
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  return path
