"""Train-step cost per execution mode: masked (every layer at its largest size) against active
(each elastic block computes only its active subnet).

For each mode three jitted steps are compiled and timed: plain training of the largest subnet,
of the smallest subnet, and the sandwich step (largest, smallest, 2 random; in-place
distillation). Rounds are interleaved (every step of every mode once per round), so machine noise
hits all of them alike; the table gives medians, compile times, and two shape ratios: sandwich /
largest (PyTorch OFA: 1.7x, issue 13) and the smallest step's share of the largest's time against
its share of the MACs (1.0 means compute follows MACs exactly). ``--steps half`` adds plain
training of a transformer's half-width subnet (``width_arch(0.5)``, DynaBERT's width multiplier);
``--options`` takes model options as JSON.

    PYTHONPATH=. python bench/bench_train_step.py                 # default config (tiny, 28x28)
    PYTHONPATH=. python bench/bench_train_step.py --model ofa_mbv3 --resolution 128 --batch 32
    PYTHONPATH=. python bench/bench_train_step.py --model elastic_bert --resolution 128 \
        --batch 8 --steps largest,smallest,half --options '{"width_buckets": [0.5, 1.0]}'
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
from ofajax import workdir as workdir_lib

STEPS = ("largest", "smallest", "half", "sandwich4")
DEFAULT_STEPS = ("largest", "smallest", "sandwich4")


def build(config, model, space, num_subnets: int, restrict: dict, batch: int, resolution: int):
  """A zero-argument callable running one train step, and its compile time in seconds."""
  phase = training.Phase(ml_collections.ConfigDict({
      "name": "bench", "epochs": 1, "learning_rate": 0.01, "num_subnets": num_subnets,
      "sampling": "sandwich" if num_subnets > 1 else "random", "restrict": restrict}), 0, space,
      1000)
  x = sample_batch(model, resolution, batch)
  y = jnp.arange(batch) % model.num_classes
  state, tx = workdir_lib.init_state(model, config.seed, lambda p: training.make_optimizer(
      config, training.make_schedule([phase]), p), x[:1])
  step = training.make_train_step(model, space, config, tx, num_subnets)
  data = phase.as_data()
  t0 = time.perf_counter()
  compiled = step.lower(state, x, y, data, resolution=resolution).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state}

  def call():
    box["state"], metrics = compiled(box["state"], x, y, data)
    jax.block_until_ready(metrics)

  call()  # warm-up
  return call, compile_s


def sample_batch(model, resolution: int, batch: int):
  """Random inputs: images, or token ids without padding."""
  if models.takes_tokens(model):
    return jax.random.randint(jax.random.key(0), (batch, resolution), 1, model.vocab_size)
  return models.sample_input(model, resolution, batch) * jax.random.normal(
      jax.random.key(0), (batch, resolution, resolution, 1))


def only(arch) -> dict:
  """A restriction of every position of every leaf to ``arch``'s value there."""
  return {k: np.asarray(v)[..., None].tolist() for k, v in arch.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="")
  p.add_argument("--resolution", type=int, default=0)
  p.add_argument("--batch", type=int, default=0)
  p.add_argument("--modes", default="masked,active")
  p.add_argument("--steps", default=",".join(DEFAULT_STEPS), help=f"some of {STEPS}")
  p.add_argument("--options", default="{}", help="model options, JSON")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="")
  args = p.parse_args()
  config = default.get_config()
  options = dict(config.model_options)
  if args.model and args.model != config.model:
    config.model, options = args.model, {}
  options.update(json.loads(args.options))
  resolution = args.resolution or config.resolution
  batch = args.batch or config.batch_size
  modes = args.modes.split(",")
  steps = [s for s in STEPS if s in args.steps.split(",")]
  plain = default.get_config()
  plain.distill = "none"

  calls, compile_s = {}, {}
  for mode in modes:
    options["execution"] = mode
    model, space = models.get(config.model, **options)
    largest, smallest = only(space.largest()), only(space.smallest())
    for name, cfg, n, restrict in (("largest", plain, 1, largest),
                                   ("smallest", plain, 1, smallest),
                                   ("half", plain, 1, None),
                                   ("sandwich4", config, 4, {})):
      if name not in steps:
        continue
      restrict = only(model.width_arch(0.5)) if name == "half" else restrict
      calls[mode, name], compile_s[mode, name] = build(cfg, model, space, n, restrict, batch,
                                                       resolution)
  macs_share = float(model.cost(space.smallest(), resolution)[0]
                     / model.cost(space.largest(), resolution)[0])

  times = {key: [] for key in calls}
  for _ in range(args.repeats):  # interleaved rounds
    for key, call in calls.items():
      t0 = time.perf_counter()
      call()
      times[key].append(time.perf_counter() - t0)
  med = {key: float(np.median(v)) for key, v in times.items()}

  size = f"length {resolution}" if models.takes_tokens(model) else f"{resolution}x{resolution}"
  print(f"{config.model}, batch {batch}, {size}, "
        f"{jax.devices()[0].platform}, median of {args.repeats} interleaved rounds")
  print(f"{'step':<12}" + "".join(f"{m + ' ms':>14}{'compile s':>11}" for m in modes)
        + (f"{'speed-up':>10}" if len(modes) == 2 else ""))
  for name in steps:
    row = f"{name:<12}" + "".join(f"{1000 * med[m, name]:>14.1f}{compile_s[m, name]:>11.1f}"
                                  for m in modes)
    if len(modes) == 2:
      row += f"{med[modes[0], name] / med[modes[1], name]:>9.2f}x"
    print(row)
  shape = {}
  for m in modes if set(DEFAULT_STEPS) <= set(steps) else ():
    shape[m] = {"sandwich_over_largest": med[m, "sandwich4"] / med[m, "largest"],
                "smallest_time_share": med[m, "smallest"] / med[m, "largest"]}
    print(f"{m}: sandwich / largest = {shape[m]['sandwich_over_largest']:.2f}x; smallest takes "
          f"{shape[m]['smallest_time_share']:.2f} of the largest's time for {macs_share:.2f} of "
          f"its MACs ({shape[m]['smallest_time_share'] / macs_share:.2f}x its MACs share)")

  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"train_step_{config.model}_{resolution}_b{batch}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"model": config.model, "batch": batch, "resolution": resolution,
               "jax": jax.__version__, "device": str(jax.devices()[0]),
               "machine": platform.machine(), "cpus": os.cpu_count(),
               "smallest_macs_share": macs_share,
               "median_s": {f"{m}/{n}": v for (m, n), v in med.items()},
               "times_s": {f"{m}/{n}": v for (m, n), v in times.items()},
               "compile_s": {f"{m}/{n}": v for (m, n), v in compile_s.items()},
               "shape": shape}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
