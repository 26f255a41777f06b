"""Preemption: SIGTERM means "save at the next step boundary and exit cleanly".

Schedulers (Cloud TPU maintenance, spot / preemptible VMs, Slurm, Kubernetes) send SIGTERM and
wait a grace period before SIGKILL. The training loop asks ``requested(step)`` after each step;
when it says yes, every process saves a checkpoint of that step and stops, and rerunning the
same command resumes from it.

- One process: a Python SIGTERM handler sets a flag (it only records; the loop does the work
  at a step boundary, where the state is consistent).
- Several processes: the signal reaches one host, or all at different moments, and all must
  save the same step. ``jax.distributed.initialize`` installs JAX's preemption service, which
  catches SIGTERM on any host and agrees on a step through the coordinator;
  ``multihost_utils.reached_preemption_sync_point`` is true on every process at that step. No
  Python handler then: it would replace the service's.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionGuard:
  """``with PreemptionGuard() as guard: ... if guard.requested(step): save; stop``."""

  def __init__(self):
    self.signalled = False
    self._multiprocess = jax.process_count() > 1
    self._previous = None

  def __enter__(self):
    # signal.signal only works in the main thread; elsewhere (e.g. a notebook's worker thread)
    # SIGTERM keeps its default meaning.
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.signalled = True

  def requested(self, step: int) -> bool:
    """True when the job should save ``step`` and stop; call once per step, on every process."""
    if self._multiprocess:
      try:
        self.signalled = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # the service is off (jax_enable_preemption_service=False)
        print(f"preemption checks disabled: {e}")
        self._multiprocess = False
    return self.signalled

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False
