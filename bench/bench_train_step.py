"""Cost of the sandwich train step: n=4 subnets in one step against 4x a single-subnet step.

One jitted step runs 4 subnets (largest, smallest, 2 random; in-place distillation) and applies
one update. The reference is the same train step restricted to the largest arch with one subnet
(plain supervised training of the full net), called 4 times. Ratio < 1 means the shared step
costs less than 4 separate ones (skipped blocks cost nothing under lax.cond; the smallest and
random subnets are shallower). Also prints examples/s of the sandwich step.

    PYTHONPATH=. python bench/bench_train_step.py                 # default config (tiny, 28x28)
    PYTHONPATH=. python bench/bench_train_step.py --model ofa_mbv3 --resolution 128 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import default
from ofajax import models
from ofajax import train as training


def build(config, model, space, num_subnets: int, restrict: dict, batch: int, resolution: int,
          channels: int):
  phase = training.Phase(ml_collections.ConfigDict({
      "name": "bench", "epochs": 1, "learning_rate": 0.01, "num_subnets": num_subnets,
      "sampling": "sandwich" if num_subnets > 1 else "random", "restrict": restrict}), 0, space, 1000)
  x = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, channels))
  y = jnp.arange(batch) % model.num_classes
  state, tx = training.init_state(model, config, lambda p: training.make_optimizer(
      config, training.make_schedule([phase]), p), x[:1])
  step = training.make_train_step(model, space, config, tx, num_subnets)
  data = phase.as_data()
  t0 = time.perf_counter()
  compiled = step.lower(state, x, y, data, resolution=resolution).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, x, y, data)  # warm-up
  jax.block_until_ready(m)
  box = {"state": state}

  def call():
    box["state"], metrics = compiled(box["state"], x, y, data)
    jax.block_until_ready(metrics)

  return call, compile_s


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="")
  p.add_argument("--resolution", type=int, default=0)
  p.add_argument("--batch", type=int, default=0)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "train_step.json"))
  args = p.parse_args()
  config = default.get_config()
  options = dict(config.model_options)
  if args.model:
    config.model = args.model
  channels = 1 if config.model.endswith("_tiny") else 3
  resolution = args.resolution or config.resolution
  batch = args.batch or config.batch_size
  model, space = models.get(config.model, **options)
  if model.in_channels != channels:
    channels = model.in_channels
  largest_only = {leaf: [int(np.max(np.asarray(v)))] for leaf, v in space.largest().items()}
  sandwich, c4 = build(config, model, space, 4, {}, batch, resolution, channels)
  config_single = default.get_config()
  config_single.distill = "none"
  single, c1 = build(config_single, model, space, 1, largest_only, batch, resolution, channels)
  times = {"sandwich4": [], "single_x4": []}
  for _ in range(args.repeats):  # interleaved so machine noise hits both alike
    t0 = time.perf_counter(); sandwich(); times["sandwich4"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(4):
      single()
    times["single_x4"].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  ratio = med["sandwich4"] / med["single_x4"]
  rows = [("sandwich step, 4 subnets", med["sandwich4"], batch / med["sandwich4"], c4),
          ("4 x single-subnet step (largest)", med["single_x4"], 4 * batch / med["single_x4"], c1)]
  print(f"{config.model} batch {batch} {resolution}x{resolution} on {jax.devices()[0].platform}, "
        f"median of {args.repeats} interleaved rounds")
  print(f"{'':<34}{'ms':>10}{'examples/s':>12}{'compile s':>11}")
  for name, t, eps, c in rows:
    print(f"{name:<34}{1000 * t:>10.1f}{eps:>12.1f}{c:>11.1f}")
  print(f"ratio sandwich / (4 x single) = {ratio:.2f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"model": config.model, "batch": batch, "resolution": resolution,
               "jax": jax.__version__, "device": str(jax.devices()[0]),
               "machine": platform.machine(), "times_s": times, "median_s": med,
               "ratio": ratio, "examples_per_s_sandwich": batch / med["sandwich4"],
               "compile_s": {"sandwich4": c4, "single": c1}}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
