"""Masking overhead of the OFA MobileNetV3 supernet against the same network built dense.

The supernet runs an arch as traced data (prefix channel masks, a zero-padded kernel picked by a
traced index, gates on blocks), so one compiled function serves every subnet. This benchmark puts
a price on that: for ``space.largest()`` it times the masked supernet (arch passed to the jitted
function as an ordinary, traced argument) against ``ofajax.export.extract_subnet``'s dense model
of the same arch, forward (eval mode) and forward+backward (train mode, cross-entropy to random
labels, gradient w.r.t. params, ``mutable=["batch_stats"]``), for both depthwise implementations.
The target is a masked / dense ratio <= 1.15.

Timing: every function is compiled ahead of time (compile excluded; compiles run ``--jobs`` at a
time, XLA's compiler being mostly single-threaded), warmed up, then masked and dense calls are
interleaved round by round (ABBA order) so machine noise hits both alike. Each cell reports the
median and interquartile range over its rounds; a cell stops early once it has spent
``--cell-seconds`` and has at least ``--min-repeats`` rounds.

    PYTHONPATH=. python bench/bench_masking.py            # ofa_mbv3, 128x128, batch 16
    PYTHONPATH=. python bench/bench_masking.py --quick    # ofa_mbv3_tiny, 28x28x1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Callable

MODES = ("fwd", "fwd+bwd")
TARGET = 1.15


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="ofa_mbv3", help="registry name (ofajax.models.names())")
  p.add_argument("--resolution", type=int, default=128)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5, help="timed rounds per cell (at most)")
  p.add_argument("--min-repeats", type=int, default=3,
                 help="rounds a cell always gets, whatever --cell-seconds says")
  p.add_argument("--cell-seconds", type=float, default=60.0,
                 help="stop a cell's rounds after this many seconds (0: always --repeats)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls per function after compile")
  p.add_argument("--impls", default="shift,xla", help="depthwise impls, comma-separated")
  p.add_argument("--modes", default=",".join(MODES), help="fwd, fwd+bwd or both")
  p.add_argument("--quick", action="store_true",
                 help="ofa_mbv3_tiny at 28x28x1 (sets --model and --resolution)")
  p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                 help="functions compiled concurrently")
  p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(__file__), "results",
                                                     "jax_cache"),
                 help="JAX persistent compilation cache ('' to disable); compiles dominate "
                      "this benchmark's wall time, and the cache makes reruns cheap")
  p.add_argument("--platform", default="cpu", help="JAX platform to run on")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "masking.json"))
  args = p.parse_args(argv)
  if args.quick:
    args.model, args.resolution = "ofa_mbv3_tiny", 28
  args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
  args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
  bad = sorted(set(args.modes) - set(MODES))
  if bad:
    p.error(f"unknown modes {bad}; choose from {list(MODES)}")
  if args.repeats < 1 or args.min_repeats < 1:
    p.error("--repeats and --min-repeats must be >= 1")
  return args


# --------------------------------------------------------------------------- the functions timed


@dataclasses.dataclass
class Pair:
  """One table row: a masked and a dense function of the same computation, with their inputs."""
  impl: str
  mode: str
  masked: Callable
  masked_args: tuple
  dense: Callable
  dense_args: tuple
  compiled: dict = dataclasses.field(default_factory=dict)   # "masked" / "dense" -> executable
  compile_s: dict = dataclasses.field(default_factory=dict)


def build_pairs(args, jax, jnp, variables, arch, x, labels, dropout_key) -> list[Pair]:
  import ofajax.models
  import ofajax.export

  def xent(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  pairs = []
  for impl in args.impls:
    model, space = ofajax.models.get(args.model, depthwise_impl=impl)
    dense_model, dense_vars = ofajax.export.extract_subnet(model, variables, arch, space)

    # The arch is an ordinary (traced) argument of the masked functions: one executable serves
    # every subnet. The dense model's shapes are the arch, so its functions take none.
    def fwd_masked(variables, x, arch, model=model):
      return model.apply(variables, x, arch, train=False)

    def fwd_dense(variables, x, dense_model=dense_model):
      return dense_model.apply(variables, x, train=False)

    def step_masked(params, batch_stats, x, labels, key, arch, model=model):
      def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, arch,
                                      train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return xent(logits, labels), updates["batch_stats"]
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, grads, stats

    def step_dense(params, batch_stats, x, labels, key, dense_model=dense_model):
      def loss_fn(params):
        logits, updates = dense_model.apply({"params": params, "batch_stats": batch_stats}, x,
                                            train=True, mutable=["batch_stats"],
                                            rngs={"dropout": key})
        return xent(logits, labels), updates["batch_stats"]
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return loss, grads, stats

    if "fwd" in args.modes:
      pairs.append(Pair(impl, "fwd", fwd_masked, (variables, x, arch), fwd_dense,
                        (dense_vars, x)))
    if "fwd+bwd" in args.modes:
      pairs.append(Pair(impl, "fwd+bwd", step_masked,
                        (variables["params"], variables["batch_stats"], x, labels, dropout_key,
                         arch),
                        step_dense,
                        (dense_vars["params"], dense_vars["batch_stats"], x, labels,
                         dropout_key)))
  return pairs


def compile_all(jax, pairs: list[Pair], jobs: int):
  """Lowers every function (Python, one at a time), then compiles ``jobs`` at a time."""
  lowered = [(pair, which, jax.jit(getattr(pair, which)).lower(*getattr(pair, which + "_args")))
             for pair in pairs for which in ("masked", "dense")]

  def compile_one(item):
    pair, which, low = item
    start = time.perf_counter()
    exe = low.compile()
    return pair, which, exe, time.perf_counter() - start

  with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    for pair, which, exe, seconds in pool.map(compile_one, lowered):
      pair.compiled[which] = exe
      pair.compile_s[which] = seconds
      print(f"  compiled {pair.impl:5s} {pair.mode:7s} {which:6s} {seconds:6.1f} s", flush=True)


# --------------------------------------------------------------------------- timing


def time_pair(jax, pair: Pair, args) -> dict:
  """Interleaved rounds (ABBA) of masked and dense calls; returns per-call times in ms."""
  calls = {w: (lambda w=w: jax.block_until_ready(pair.compiled[w](*getattr(pair, w + "_args"))))
           for w in ("masked", "dense")}
  for _ in range(args.warmup):
    for w in ("masked", "dense"):
      calls[w]()
  times = {"masked": [], "dense": []}
  start = time.perf_counter()
  for r in range(args.repeats):
    order = ("masked", "dense") if r % 2 == 0 else ("dense", "masked")
    for w in order:
      t0 = time.perf_counter()
      calls[w]()
      times[w].append((time.perf_counter() - t0) * 1e3)
    spent = time.perf_counter() - start
    if args.cell_seconds and r + 1 >= args.min_repeats and spent > args.cell_seconds:
      break
  return times


def summarize(np, ms: list[float]) -> dict:
  q25, q50, q75 = np.percentile(ms, [25, 50, 75])
  return {"median_ms": float(q50), "q25_ms": float(q25), "q75_ms": float(q75),
          "iqr_ms": float(q75 - q25), "rounds": len(ms), "all_ms": [float(t) for t in ms]}


# --------------------------------------------------------------------------- reporting


def device_info(jax) -> dict:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"platform": dev.platform, "device_kind": dev.device_kind, "device_count":
          jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count()}


def table(rows: list[list[str]], right: set[int]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = []
  for n, r in enumerate(rows):
    cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
    lines.append("  ".join(cells).rstrip())
    if n == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def fmt_ms(s: dict) -> str:
  return f"{s['median_ms']:.1f} ±{s['iqr_ms']:.1f}"


def main(argv=None):
  args = parse_args(argv)
  import jax
  jax.config.update("jax_platforms", args.platform)
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.cache_dir))
  import jax.numpy as jnp
  import numpy as np
  import ofajax.models

  wall0 = time.perf_counter()
  model, space = ofajax.models.get(args.model)
  arch = space.largest()
  smallest = space.smallest()
  print(f"{args.model}: {args.batch}x{args.resolution}x{args.resolution}x{model.in_channels}, "
        f"arch = largest ({space.name(arch)}), {jax.devices()[0].device_kind} "
        f"x{os.cpu_count()} cores, jax {jax.__version__}", flush=True)

  # Parameters do not depend on the depthwise impl nor on the resolution (global pooling), so
  # one small init serves every model here. An RBG key keeps XLA's init compile short.
  t0 = time.perf_counter()
  variables = jax.jit(model.init)(jax.random.key(args.seed, impl="unsafe_rbg"),
                                  jnp.zeros((1, 32, 32, model.in_channels)), arch)
  variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)
  init_s = time.perf_counter() - t0
  rng = np.random.default_rng(args.seed)
  x = jnp.asarray(rng.standard_normal((args.batch, args.resolution, args.resolution,
                                       model.in_channels)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, model.num_classes, args.batch), jnp.int32)
  dropout_key = jax.random.key(args.seed + 1)

  pairs = build_pairs(args, jax, jnp, variables, arch, x, labels, dropout_key)
  print(f"compiling {2 * len(pairs)} functions, {args.jobs} at a time "
        f"(cache: {args.cache_dir or 'off'})", flush=True)
  t0 = time.perf_counter()
  compile_all(jax, pairs, args.jobs)
  compile_wall_s = time.perf_counter() - t0

  # Sanity checks, untimed: the masked net at the largest arch is the dense net (eval mode),
  # and the one masked executable also runs the smallest arch (the arch really is data).
  checks = {}
  for pair in pairs:
    if pair.mode != "fwd":
      continue
    masked_out = pair.compiled["masked"](*pair.masked_args)
    dense_out = pair.compiled["dense"](*pair.dense_args)
    small_out = pair.compiled["masked"](*pair.masked_args[:-1], smallest)
    checks[pair.impl] = {
        "max_abs_diff_masked_vs_dense": float(jnp.max(jnp.abs(masked_out - dense_out))),
        "smallest_arch_runs_same_executable": bool(np.all(np.isfinite(np.asarray(small_out)))),
    }

  results = []
  for pair in pairs:
    times = time_pair(jax, pair, args)
    m, d = summarize(np, times["masked"]), summarize(np, times["dense"])
    paired = [a / b for a, b in zip(times["masked"], times["dense"])]
    res = {"impl": pair.impl, "mode": pair.mode, "dense": d, "masked": m,
           "overhead": m["median_ms"] / d["median_ms"],
           "overhead_paired_median": float(np.median(paired)),
           "compile_s": pair.compile_s}
    results.append(res)
    print(f"  timed {pair.impl:5s} {pair.mode:7s} dense {fmt_ms(d):>16s} ms  masked "
          f"{fmt_ms(m):>16s} ms  ({m['rounds']} rounds)", flush=True)

  # Shift-vs-xla speed of the same network (dense and masked): xla time / shift time.
  impl_ratio = {}
  by = {(r["impl"], r["mode"]): r for r in results}
  for mode in args.modes:
    if ("shift", mode) in by and ("xla", mode) in by:
      impl_ratio[mode] = {w: by["xla", mode][w]["median_ms"] / by["shift", mode][w]["median_ms"]
                          for w in ("dense", "masked")}

  rows = [["impl", "mode", "dense ms", "masked ms", "overhead"]]
  for r in results:
    flag = "" if r["overhead"] <= TARGET else "  > target"
    rows.append([r["impl"], r["mode"], fmt_ms(r["dense"]), fmt_ms(r["masked"]),
                 f"{r['overhead']:.2f}{flag}"])
  print()
  print(f"{args.model}  batch {args.batch}  {args.resolution}x{args.resolution}  "
        f"median ±IQR over interleaved rounds; overhead = masked / dense (target <= {TARGET})")
  print(table(rows, right={2, 3, 4}))
  if impl_ratio:
    print()
    rows = [["mode", "xla/shift dense", "xla/shift masked"]]
    for mode, rr in impl_ratio.items():
      rows.append([mode, f"{rr['dense']:.2f}x", f"{rr['masked']:.2f}x"])
    print(table(rows, right={1, 2}))
  for impl, c in checks.items():
    print(f"check {impl}: |masked - dense| max {c['max_abs_diff_masked_vs_dense']:.2e} (eval), "
          f"smallest arch through the same executable: "
          f"{'ok' if c['smallest_arch_runs_same_executable'] else 'FAILED'}")

  report = {
      "benchmark": "masking",
      "config": {k: v for k, v in vars(args).items()},
      "arch": json.loads(space.to_json(arch)),
      "jax_version": jax.__version__,
      "jaxlib_version": getattr(__import__("jaxlib"), "__version__", None),
      "python": sys.version.split()[0],
      "device": device_info(jax),
      "target_overhead": TARGET,
      "results": results,
      "xla_over_shift": impl_ratio,
      "checks": checks,
      "init_s": init_s,
      "compile_wall_s": compile_wall_s,
      "wall_s": time.perf_counter() - wall0,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"\nwrote {args.out} (wall {report['wall_s']:.0f} s, compile {compile_wall_s:.0f} s)")
  return report


if __name__ == "__main__":
  main()
