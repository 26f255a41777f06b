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
- Several processes without that service (``jax_enable_preemption_service=False``, or a
  backend that runs several processes without ``jax.distributed``): the Python handler again,
  and the processes agree with a one-flag all-gather after every step (any process signalled:
  all stop at that step). That costs a host synchronisation per step, hence the warning.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def _preemption_service_running() -> bool:
  """Whether JAX's preemption sync manager is up (it is the one catching SIGTERM then)."""
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    state = jax_distributed.global_state
  except (ImportError, AttributeError):  # moved in a later JAX: take the safe path below
    return False
  return (getattr(state, "client", None) is not None
          and getattr(state, "preemption_sync_manager", None) is not None)


class PreemptionGuard:
  """``with PreemptionGuard() as guard: ... if guard.requested(step): save; stop``."""

  def __init__(self):
    self.signalled = False
    self._multiprocess = jax.process_count() > 1
    # The JAX service handles SIGTERM; otherwise the Python handler below does.
    self._service = self._multiprocess and _preemption_service_running()
    self._previous = None
    self.handler_installed = False

  def __enter__(self):
    if not self._service:
      self._install_handler()
      if self._multiprocess:
        logging.warning("JAX's preemption service is off (jax_enable_preemption_service=False "
                        "or no jax.distributed client): SIGTERM is caught by a Python handler "
                        "and the %d processes agree on the step to save with an all-gather "
                        "after every step", jax.process_count())
    return self

  def _install_handler(self) -> None:
    # signal.signal only works in the main thread; elsewhere (e.g. a notebook's worker thread)
    # SIGTERM keeps its default meaning.
    if threading.current_thread() is not threading.main_thread():
      logging.warning("PreemptionGuard outside the main thread: SIGTERM is not caught, the job "
                      "stops without saving a checkpoint")
      return
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    self.handler_installed = True

  def _handle(self, signum, frame):
    del signum, frame
    self.signalled = True

  def requested(self, step: int) -> bool:
    """True when the job should save ``step`` and stop; call once per step, on every process."""
    if self._service:
      try:
        self.signalled = multihost_utils.reached_preemption_sync_point(step)
        return self.signalled
      except RuntimeError as e:  # the service went away: the Python handler takes over
        logging.warning("preemption service unavailable (%s); using a SIGTERM handler", e)
        self._service = False
        self._install_handler()
    if self._multiprocess:
      # Every process calls this at the same step, so all see the same flags and stop together.
      flags = multihost_utils.process_allgather(np.asarray(self.signalled, np.int32))
      self.signalled = bool(np.any(flags))
    return self.signalled

  def __exit__(self, *exc):
    if self.handler_installed:
      # None: the previous handler was not set from Python; the default is the best guess.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._previous, self.handler_installed = None, False
    return False
