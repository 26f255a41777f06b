"""A one-line console progress bar shared by training and search."""

from __future__ import annotations

import sys
import time


class ProgressBar:
  """``[#####     ] done/total <text> <rate> <unit>/s ETA``, rewritten in place.

  ``total=None`` drops the bar and the ETA (open-ended work such as a greedy search).
  ``per_step`` converts steps into the unit of the rate (e.g. the batch size: examples/s).
  """

  def __init__(self, total: int | None = None, *, start: int = 0, per_step: float = 1,
               unit: str = "steps", enabled: bool = True):
    self.total, self.start, self.per_step, self.unit = total, start, per_step, unit
    self.enabled = enabled
    self.t0 = time.time()

  def update(self, done: int, text: str = "") -> None:
    if not self.enabled:
      return
    elapsed = max(time.time() - self.t0, 1e-9)
    count = done - self.start
    rate = count * self.per_step / elapsed
    if self.total:
      head = f"[{'#' * int(30 * min(done, self.total) / self.total):<30}] {done}/{self.total}"
      tail = f"ETA {(self.total - done) * elapsed / max(count, 1):,.0f}s"
    else:
      head, tail = str(done), f"{elapsed:,.0f}s"
    sys.stdout.write(f"\r{head} {text} {rate:,.1f} {self.unit}/s {tail}  ")
    sys.stdout.flush()

  def close(self) -> None:
    if self.enabled:
      sys.stdout.write("\n")
      sys.stdout.flush()
