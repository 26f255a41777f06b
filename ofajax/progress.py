"""A one-line console progress bar shared by training and search: a thin wrapper of tqdm."""

from __future__ import annotations

import sys

from tqdm import tqdm


class ProgressBar:
  """``done/total [elapsed<ETA, rate unit/s, text]`` with a bar, rewritten in place on stdout.

  ``total=None`` drops the bar and the ETA (open-ended work such as a greedy search).
  ``start``: the step a resumed run starts from (the rate counts from there).
  ``per_step`` converts steps into the unit shown (e.g. the batch size: examples and
  examples/s); ``update`` still takes steps. ``enabled=False`` (every process but 0) prints
  nothing.
  """

  def __init__(self, total: int | None = None, *, start: int = 0, per_step: float = 1,
               unit: str = "steps", enabled: bool = True):
    self.total, self.start, self.per_step, self.unit = total, start, per_step, unit
    self.enabled = enabled
    self._bar = tqdm(total=total, initial=start, unit=unit, disable=not enabled,
                     unit_scale=per_step if per_step != 1 else False, file=sys.stdout,
                     dynamic_ncols=True, leave=True)

  def update(self, done: int, text: str = "") -> None:
    """``done`` steps in all (not an increment); ``text`` follows the rate (e.g. the loss)."""
    if not self.enabled:
      return
    self._bar.set_postfix_str(text, refresh=False)
    self._bar.update(done - self._bar.n)

  def close(self) -> None:
    self._bar.close()
