"""PreemptionGuard: SIGTERM becomes "save this step and stop" in every mode, never a bare death.

The two-process runs are subprocesses over gloo on 127.0.0.1 (jax.distributed must start before
any computation, so not in the pytest process), one CPU device each.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from ofajax.preemption import PreemptionGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_for(predicate, timeout=5.0):
  deadline = time.time() + timeout
  while not predicate() and time.time() < deadline:
    time.sleep(0.01)
  return predicate()


def test_one_process_sigterm_is_recorded_and_the_handler_restored():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert signal.getsignal(signal.SIGTERM) == guard._handle  # pylint: disable=protected-access
    assert not guard.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert _wait_for(lambda: guard.requested(2))
  assert signal.getsignal(signal.SIGTERM) == before


# Process 1 sends itself SIGTERM at step 3; every process prints the step it stops at.
_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import jax
    jax.config.update("jax_enable_preemption_service", sys.argv[3] == "on")
    from ofajax import distributed
    from ofajax.preemption import PreemptionGuard
    pid = int(sys.argv[2])
    distributed.initialize(sys.argv[1], 2, pid)
    with PreemptionGuard() as guard:
      print("handler", callable(signal.getsignal(signal.SIGTERM)), flush=True)
      for step in range(1, 400):
        if pid == 1 and step == 3:
          os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.02)  # a training step; lets the service's notice go round
        if guard.requested(step):
          print("stop", step, flush=True)
          break
      else:
        print("never stopped", flush=True)
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(service):
  address = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, address, str(i), service], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [p.returncode for p in procs], outs


def _stop_steps(outs):
  return [int(out.split("stop ")[1].split()[0]) if "stop " in out else None for out in outs]


def test_two_processes_without_the_preemption_service_catch_sigterm_and_agree():
  """The fallback: a Python handler on each process and an all-gather to agree on the step.

  Without the handler process 1 is killed by its SIGTERM and process 0 never stops."""
  codes, outs = _two_processes("off")
  assert codes == [0, 0], "\n----\n".join(o[-2000:] for o in outs)
  assert all("handler True" in o for o in outs), outs
  assert _stop_steps(outs) == [3, 3], outs


def test_two_processes_with_the_preemption_service_leave_sigterm_to_it():
  codes, outs = _two_processes("on")
  assert codes == [0, 0], "\n----\n".join(o[-2000:] for o in outs)
  assert all("handler False" in o for o in outs), outs
  steps = _stop_steps(outs)
  assert steps[0] == steps[1] and steps[0] >= 3, outs
