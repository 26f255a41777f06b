"""Scale-out: 8 simulated devices equal 1, two processes over gloo (with a SIGTERM that both
honour), preemption and exact resume after SIGKILL, bfloat16 compute, and the errors for bad
device / batch settings.

Runs that need several devices or processes are subprocesses: XLA_FLAGS must be set before jax
is imported. They all see 8 simulated CPU devices and share one persistent compile cache, so a
single-device program compiled by one test is a cache hit for the next.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofajax import data, distributed, models, optimizer, precision
from ofajax import train as training
from ofajax.workdir import Checkpoints, abstract_state
from ofajax.phases import Phase
from tests import tiny_dist_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_dist_config.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  data.ensure_local_dataset("digits", path)
  return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def _env(cache_dir, devices=8):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return env


def _train_cmd(workdir, data_dir, *flags):
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", CONFIG, "--workdir", workdir,
          f"--config.data_dir={data_dir}", *flags]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"loss"' in line]


def _restore(workdir, step=None):
  """A checkpoint of tiny_dist_config onto this process's one device."""
  config = tiny_dist_config.get_config()
  model, space = models.get(config.model, **dict(config.model_options))
  phase = Phase(config.phases[0], 0, space, 44)
  tx_factory = lambda p: optimizer.make_optimizer(config, optimizer.make_schedule([phase]), p)
  sample = jnp.zeros((1, 8, 8, 1))
  target, _ = abstract_state(model, tx_factory, sample,
                             jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  state, _ = Checkpoints(workdir).restore(target, step)
  return state


# --------------------------------------------------------------------------- 8 devices = 1


_SHARDED_VS_SINGLE = """
import sys
from ofajax import train as training
from tests import tiny_dist_config
data_dir, *workdirs = sys.argv[1:]
for n, workdir in zip((1, 8), workdirs):
  c = tiny_dist_config.get_config()
  c.data_dir, c.num_devices, c.stop_after_steps = data_dir, n, 10
  training.train_and_evaluate(c, workdir)
"""


def test_8_devices_match_one_device_after_10_steps(tmp_path, data_dir, cache_dir):
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  out = subprocess.run([sys.executable, "-c", _SHARDED_VS_SINGLE, data_dir, one, eight],
                       cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh {'data': 1, 'model': 1} over 1 cpu device(s)" in out.stdout
  assert "mesh {'data': 8, 'model': 1} over 8 cpu device(s)" in out.stdout
  a, b = _metrics(one), _metrics(eight)
  assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 11))
  for key in ("loss", "loss_largest", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=2e-5, err_msg=key)
  # the losses moved, so the comparison is not between two untrained nets
  assert a[-1]["loss_largest"] < a[0]["loss_largest"] - 0.05
  sa, sb = _restore(one), _restore(eight)
  assert int(sa.step) == int(sb.step) == 10
  flat_a = dict(jax.tree_util.tree_leaves_with_path(sa))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(sb))
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    x, y = np.asarray(flat_a[path]), np.asarray(flat_b[path])
    if jnp.issubdtype(x.dtype, jnp.floating):
      np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_over_gloo_train_and_save_one_checkpoint_on_sigterm(tmp_path, data_dir):
  """Two train.py processes (gloo, coordinator on 127.0.0.1) train one model; a SIGTERM to
  process 1 alone makes both save the same step and exit cleanly."""
  workdir = str(tmp_path / "two")
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      _train_cmd(workdir, data_dir, "--config.stop_after_steps=60",
                 "--config.checkpoint_every_steps=100", f"--coordinator_address={coordinator}",
                 "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=_env(None, devices=1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  try:
    _signal_at(procs[1], workdir, 3, signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  # one mesh over both processes' devices; only process 0 logs
  assert "mesh {'data': 2, 'model': 1} over 2 cpu device(s), 2 process(es)" in outs[0]
  assert "mesh" not in outs[1]
  assert "SIGTERM: saved checkpoint" in outs[0], outs[0][-3000:]
  saved = int(outs[0].split("SIGTERM: saved checkpoint ")[1].split()[0])
  assert 3 <= saved < 60, "the notice did not reach process 0 (it ran to the end)"
  assert [m["step"] for m in _metrics(workdir)] == list(range(1, saved + 1))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(saved)]
  state = _restore(workdir)
  assert int(state.step) == saved
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


# --------------------------------------------------------------------------- preemption


def _signal_at(proc, workdir, step, sig):
  """Sends ``sig`` to ``proc`` once metrics.jsonl shows ``step`` (or gives up when it exits)."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and any(m["step"] >= step for m in _metrics(workdir)):
      proc.send_signal(sig)
      return
    time.sleep(0.02)


def _run_until(cmd, env, workdir, step, sig):
  """Starts cmd, sends ``sig`` once metrics.jsonl shows ``step``; returns (returncode, output)."""
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  try:
    _signal_at(p, workdir, step, sig)
    out = p.communicate(timeout=300)[0]
  finally:
    if p.poll() is None:
      p.kill()
  return p.returncode, out


def test_sigterm_saves_and_sigkill_resumes_bitwise(tmp_path, data_dir, cache_dir):
  env = _env(cache_dir)
  steps = "--config.stop_after_steps=150"
  flags = (steps, "--config.num_devices=1")
  reference = str(tmp_path / "reference")
  out = subprocess.run(_train_cmd(reference, data_dir, *flags), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  workdir = str(tmp_path / "interrupted")
  cmd = _train_cmd(workdir, data_dir, *flags)
  # SIGTERM: a checkpoint at the step boundary that followed it, exit status 0, no later steps.
  code, out = _run_until(cmd, env, workdir, 12, signal.SIGTERM)
  assert code == 0, out[-3000:]
  assert "SIGTERM: saved checkpoint" in out, out[-3000:]
  saved = int(out.split("SIGTERM: saved checkpoint ")[1].split()[0])
  assert 12 <= saved < 150
  assert Checkpoints(workdir).latest_step() == saved
  assert max(m["step"] for m in _metrics(workdir)) == saved

  # SIGKILL: no chance to save; the rerun resumes from the last periodic checkpoint (every 10
  # steps; 25 steps in, at least one of them has finished its asynchronous write).
  code, out = _run_until(cmd, env, workdir, saved + 25, signal.SIGKILL)
  assert code == -signal.SIGKILL, f"the run was not killed in the middle ({code}):\n{out[-2000:]}"
  assert f"at step {saved}" in out
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  resumed = int(out.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
  assert saved < resumed < 150

  a, b = _restore(reference), _restore(workdir)
  assert int(a.step) == int(b.step) == 150
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- bfloat16


def test_bfloat16_compute_trains_with_float32_state(tmp_path, data_dir):
  config = tiny_dist_config.get_config()
  config.data_dir, config.compute_dtype, config.stop_after_steps = data_dir, "bfloat16", 30
  workdir = str(tmp_path / "bf16")
  training.train_and_evaluate(config, workdir)
  losses = [m["loss_largest"] for m in _metrics(workdir)]  # cross-entropy of the largest net
  assert len(losses) == 30 and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
  state = _restore(workdir)  # the target is float32: a bf16 leaf would not restore as-is
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(state.opt_state)} <= {np.dtype("float32"),
                                                                    np.dtype("int32")}


def test_bfloat16_policy_keeps_batchnorm_in_float32():
  config = tiny_dist_config.get_config()
  model, space = models.get(config.model, **dict(config.model_options))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  variables = jax.eval_shape(model.init, jax.random.key(1), x, space.largest())
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["params"])
  cast = precision.cast_params(params, variables["batch_stats"], jnp.bfloat16)
  kept = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(cast)
          if v.dtype == jnp.float32}
  num_bn = len(jax.tree.leaves(variables["batch_stats"])) // 2  # mean + var per layer
  assert len(kept) == 2 * num_bn and all(k.endswith(("['scale']", "['bias']")) for k in kept)
  assert any(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(cast))

  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(args[0], jax.Array):
      seen.setdefault(type(context.module).__name__, set()).add((args[0].dtype, out.dtype))
    return out

  # an interceptor registered later runs inside earlier ones: record what the layers compute in
  with precision.policy(jnp.bfloat16, variables["batch_stats"]), nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, x.astype(jnp.bfloat16), space.largest(),
                                         train=True, mutable=["batch_stats"]),
                   {**variables, "params": cast})
  # BatchNorm computes in float32 (the policy casts its output back), convolutions in bfloat16.
  f32, bf16 = np.dtype("float32"), np.dtype(jnp.bfloat16)
  assert seen["ElasticBatchNorm"] == {(f32, f32)}
  assert seen["ElasticConvBN"] == {(bf16, bf16)}
  assert seen["OFAMobileNetV3"] == {(bf16, bf16)}


# --------------------------------------------------------------------------- bad input


def test_batch_not_divisible_by_devices_names_sizes_that_work():
  with pytest.raises(ValueError, match=r"config.batch_size=36 .* multiple of the 8 devices.*"
                                       r"use e.g. 32 or 40 \(4 or 5 examples per device\)"):
    distributed.check_batch_size(36, 8)
  with pytest.raises(ValueError, match="use e.g. 8 "):
    distributed.check_batch_size(4, 8)
  distributed.check_batch_size(32, 8)


def test_more_devices_than_visible_or_bad_dtype_is_a_clear_error(tmp_path, data_dir):
  config = tiny_dist_config.get_config()
  config.data_dir, config.num_devices = data_dir, len(jax.devices()) + 3
  with pytest.raises(ValueError, match=f"num_devices={config.num_devices} but "
                                       f"{len(jax.devices())} devices are visible"):
    training.train_and_evaluate(config, str(tmp_path / "a"))
  config = tiny_dist_config.get_config()
  config.data_dir, config.compute_dtype = data_dir, "float16"
  with pytest.raises(ValueError, match="compute_dtype must be one of .*'bfloat16'"):
    training.train_and_evaluate(config, str(tmp_path / "b"))
