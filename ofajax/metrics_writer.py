"""Training metrics to ``<workdir>/metrics.jsonl`` and to TensorBoard (``<workdir>/tensorboard/``).

  with MetricsWriter(workdir, enabled=jax.process_index() == 0) as writer:
    writer.write(step, {"phase": "full", "loss": 0.3, "learning_rate": 0.1})
    writer.write_records(step, "eval", [{"name": "largest", "top1": 0.9, "macs": 1e6}])

metrics.jsonl keeps its format: one JSON object per call, ``{"step": step, **values}``, appended
and closed at once, so a killed run loses nothing written before. TensorBoard gets the numeric
values only (strings, lists, ... go to the JSON line alone) through tensorboardX, which needs
protobuf and numpy and no TensorFlow: ``tensorboard --logdir <workdir>/tensorboard``.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_json(value):
  """numpy scalars and arrays, which json.dumps refuses, as Python numbers and lists."""
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def _is_scalar(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
      isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf")


class MetricsWriter:
  """Appends JSON lines to ``<workdir>/metrics.jsonl`` and numeric scalars to TensorBoard.

  ``enabled=False`` (every process but 0 of a multi-process job) makes every method a no-op
  and writes no file. ``purge_step``: on a resumed run, TensorBoard hides the events at and
  after this step that an earlier, killed run had written (pass the step resumed from).
  ``tensorboard=False`` writes metrics.jsonl alone.
  """

  def __init__(self, workdir: str, enabled: bool = True, *, purge_step: int | None = None,
               tensorboard: bool = True, flush_secs: int = 30):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        # The file name has whole seconds only and the file is opened with "wb": a suffix keeps
        # a second writer within the same second (a quick restart) from truncating the first.
        self._tb = SummaryWriter(self.tensorboard_dir, purge_step=purge_step,
                                 flush_secs=flush_secs,
                                 filename_suffix=f".{os.getpid()}.{time.time_ns()}")

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    """One line ``{"step": step, **values}``; each numeric value becomes a scalar ``name``."""
    if not self.enabled:
      return
    if "step" in values:
      raise ValueError("'step' is the step argument, not a value")
    self._append({"step": int(step), **values})
    self._scalars(step, values, "")

  def write_records(self, step: int, key: str, records: Iterable[Mapping[str, Any]],
                    name_field: str = "name") -> None:
    """One line ``{"step": step, key: [records]}`` (e.g. the final evaluation); each numeric
    field of a record becomes a scalar ``key/<record[name_field]>/<field>``."""
    if not self.enabled:
      return
    records = [dict(r) for r in records]
    self._append({"step": int(step), key: records})
    for i, record in enumerate(records):
      name = record.get(name_field, i)
      self._scalars(step, {k: v for k, v in record.items() if k != name_field}, f"{key}/{name}/")

  def _append(self, record: dict) -> None:
    line = json.dumps(record, default=_to_json) + "\n"
    with open(self.path, "a") as f:
      f.write(line)

  def _scalars(self, step: int, values: Mapping[str, Any], prefix: str) -> None:
    if self._tb is None:
      return
    for name, value in values.items():
      if _is_scalar(value):
        self._tb.add_scalar(prefix + name, float(value), int(step))
      elif isinstance(value, Mapping):  # nested numbers: "outer/inner"
        self._scalars(step, value, f"{prefix}{name}/")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False
