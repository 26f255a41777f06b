"""Data-parallel throughput: train-step examples/s against the number of devices in the mesh.

Each device count runs in its own process (XLA_FLAGS must be set before jax is imported). The
step is train.py's (default config: tiny OFA supernet, 28x28, sandwich of 3 subnets, in-place
distillation), jitted over a ("data", "model") mesh of n devices with the state replicated and
the batch split over "data". Strong scaling by default (the global batch stays --batch); with
--weak the per-device batch stays --batch / max(devices) and the global batch grows with n.

    PYTHONPATH=. python bench/bench_data_parallel.py                      # simulated CPU devices
    PYTHONPATH=. python bench/bench_data_parallel.py --platform gpu --devices 1,2,4,8

On CPU the devices are simulated (--xla_force_host_platform_device_count): they share the
machine's cores, and one XLA:CPU device already spreads its work over all of them, so the
numbers measure the cost of partitioning and collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(n: int, batch: int, rounds: int, steps: int, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import default
  from ofajax import distributed, models
  from ofajax import optimizer, train_step
  from ofajax.workdir import init_state
  from ofajax.phases import Phase

  config = default.get_config()
  config.model = "ofa_mbv3_tiny"  # the supernet docs/scaling.md measured
  config.compute_dtype = dtype
  model, space = models.get(config.model, **dict(config.model_options))
  phase = Phase(config.phases[0], 0, space, 1000)
  mesh = distributed.make_mesh(n)
  distributed.check_batch_size(batch, n, "--batch")
  r = config.resolution
  rng = np.random.default_rng(0)
  host = {"inputs": rng.normal(size=(batch, r, r, model.in_channels)).astype(np.float32),
          "label": (np.arange(batch) % model.num_classes).astype(np.int32)}
  b = distributed.shard_batch(host, mesh, batch)
  state, tx = init_state(model, config.seed, lambda p: optimizer.make_optimizer(
      config, optimizer.make_schedule([phase]), p), jnp.zeros((1, r, r, model.in_channels)))
  state = distributed.replicate(state, mesh)
  phase_data = distributed.replicate(phase.as_data(), mesh)
  step = train_step.make_train_step(model, space, config, tx, phase.num_subnets, mesh=mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, b["inputs"], b["label"], phase_data, resolution=r).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, b["inputs"], b["label"], phase_data)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, b["inputs"], b["label"], phase_data)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t0) / steps)
  step_s = float(np.median(times))
  return {"devices": n, "global_batch": batch, "per_device_batch": batch // n,
          "step_ms": 1000 * step_s, "examples_per_s": batch / step_s, "compile_s": compile_s,
          "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--batch", type=int, default=128, help="global batch (strong scaling)")
  p.add_argument("--weak", action="store_true", help="keep batch / max(devices) per device")
  p.add_argument("--platform", default="cpu", help="cpu (simulated devices) or gpu / tpu")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="steps per timed round")
  p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "data_parallel.json"))
  args = p.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.batch, args.rounds, args.steps, args.dtype)))
    return

  counts = [int(c) for c in args.devices.split(",")]
  rows = []
  for n in counts:
    batch = args.batch // max(counts) * n if args.weak else args.batch
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=args.platform)
    if args.platform == "cpu":
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--batch", str(batch),
           "--rounds", str(args.rounds), "--steps", str(args.steps), "--dtype", args.dtype]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
      sys.exit(f"{n} devices failed:\n{out.stderr[-3000:]}")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{n} device(s) done: {rows[-1]['examples_per_s']:.0f} examples/s", flush=True)
  base = rows[0]["examples_per_s"] / rows[0]["devices"]  # per device at the smallest count
  for r in rows:
    r["speedup"] = r["examples_per_s"] / rows[0]["examples_per_s"]
    r["efficiency"] = r["examples_per_s"] / (base * r["devices"])
  print(f"\n{'devices':>7}  {'global batch':>12}  {'per device':>10}  {'step ms':>8}  "
        f"{'examples/s':>10}  {'speed-up':>8}  {'efficiency':>10}")
  for r in rows:
    print(f"{r['devices']:>7}  {r['global_batch']:>12}  {r['per_device_batch']:>10}  "
          f"{r['step_ms']:>8.1f}  {r['examples_per_s']:>10.1f}  {r['speedup']:>8.2f}  "
          f"{100 * r['efficiency']:>9.0f}%")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"rows": rows, "args": vars(args), "cpu_count": os.cpu_count(),
               "machine": platform.processor() or platform.machine()}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
