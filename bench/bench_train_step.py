"""Train-step cost per execution mode: masked (every layer at its largest size) against active
(each elastic block computes only its active subnet).

For each mode one jitted step per ``--steps`` entry is compiled and timed; by default plain
training of the largest subnet, of the smallest subnet, and the sandwich step (largest,
smallest, 2 random; in-place distillation). Rounds are interleaved (every step of every mode
once per round), so machine noise hits all of them alike; the table gives medians, compile times, and two shape ratios: sandwich /
largest (PyTorch OFA: 1.7x, issue 13) and the smallest step's share of the largest's time against
its share of the MACs (1.0 means compute follows MACs exactly). ``--steps half`` adds plain
training of a transformer's half-width subnet (``width_arch(0.5)``, DynaBERT's width multiplier),
``middle`` of the arch taking every position's middle value (OFA-MobileNetV3: d3 k5 e4), and
``random`` of a new random arch each call (what the sandwich adds twice); ``--options`` takes
model options as JSON.

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
from ofajax import optimizer, train_step
from ofajax import workdir as workdir_lib
from ofajax.phases import Phase

STEPS = ("largest", "smallest", "middle", "random", "half", "sandwich4")
DEFAULT_STEPS = ("largest", "smallest", "sandwich4")


def bench_phase(space, num_subnets: int, restrict) -> Phase:
  return Phase(ml_collections.ConfigDict({
      "name": "bench", "epochs": 1, "learning_rate": 0.01, "num_subnets": num_subnets,
      "sampling": "sandwich" if num_subnets > 1 else "random", "restrict": restrict}), 0, space,
      1000)


def build(config, model, space, num_subnets: int, restrict: dict, batch: int, resolution: int,
          warm_archs=()):
  """A zero-argument callable running one train step, and its compile time in seconds.

  Before it returns, the step runs once per arch of ``warm_archs`` (the phase data restricted to
  that arch: same executable) and twice as asked. XLA:CPU readies a kernel the first time it
  runs, so the first step through a new branch of an active-mode step is slow (measured on the
  tiny default net: 270-550 ms more than the ~110 ms steady state); the archs of
  :func:`covering_archs` run every branch once, so the timed rounds see the steady state.
  """
  phase = bench_phase(space, num_subnets, restrict)
  x = sample_batch(model, resolution, batch)
  y = jnp.arange(batch) % model.num_classes
  state, tx = workdir_lib.init_state(model, config.seed, lambda p: optimizer.make_optimizer(
      config, optimizer.make_schedule([phase]), p), x[:1])
  step = train_step.make_train_step(model, space, config, tx, num_subnets)
  data = phase.as_data()
  t0 = time.perf_counter()
  compiled = step.lower(state, x, y, data, resolution=resolution).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state}

  def call(phase_data=data):
    box["state"], metrics = compiled(box["state"], x, y, phase_data)
    jax.block_until_ready(metrics)

  for arch in warm_archs:
    call(bench_phase(space, num_subnets, only(arch)).as_data())
  call()
  call()
  call.compiled = compiled   # for bench/profile_train_step.py (the optimized HLO)
  return call, compile_s


def covering_archs(space, limit: int = 27) -> list[dict]:
  """Archs that between them take every value at every position, in every combination across
  leaves, with the leaves that gate others (depth) at their largest so every block runs: for
  OFA-MobileNetV3 the 9 archs of one kernel size and one expand ratio everywhere. Empty when
  there would be more than ``limit`` (the caller then warms up on random archs)."""
  parents = {leaf.parent for leaf in space.leaves if leaf.gated}
  largest = {k: np.asarray(v) for k, v in space.largest().items()}
  free = [leaf for leaf in space.leaves if leaf.name not in parents]
  counts = [len(leaf.values) for leaf in free]
  if not free or np.prod(counts) > limit:
    return []
  archs = []
  for picks in np.ndindex(*counts):
    arch = dict(largest)
    for leaf, pick in zip(free, picks):
      arch[leaf.name] = per_position(space, arch, leaf, lambda c, i=pick: c[min(i, len(c) - 1)])
    archs.append(arch)
  return archs


def per_position(space, arch: dict, leaf, pick) -> np.ndarray:
  """Leaf values for ``arch``: at every position ``pick(choices)`` from the values that position
  allows under its parent's value in ``arch`` (coupling, e.g. CompOFA's depth -> expand)."""
  shape = np.asarray(space.largest()[leaf.name]).shape
  parent = (lambda pos: None) if leaf.parent is None else (
      lambda pos: int(arch[leaf.parent][pos[:np.ndim(arch[leaf.parent])]]))
  return np.array([pick(space.choices(leaf.name, pos, parent(pos))) for pos in np.ndindex(shape)],
                  np.int32).reshape(shape)


def sample_batch(model, resolution: int, batch: int):
  """Random inputs: images, or token ids without padding."""
  if models.takes_tokens(model):
    return jax.random.randint(jax.random.key(0), (batch, resolution), 1, model.vocab_size)
  return models.sample_input(model, resolution, batch) * jax.random.normal(
      jax.random.key(0), (batch, resolution, resolution, 1))


def middle(space) -> dict:
  """Every position at the middle of its allowed values (OFA-MobileNetV3: depth 3, kernel 5,
  expand 4), as host arrays; leaves follow their parents' values."""
  arch = {}
  for leaf in space.leaves:   # parents come first in a space's leaves
    arch[leaf.name] = per_position(space, arch, leaf, lambda c: c[len(c) // 2])
  return arch


def mean_macs_share(model, space, resolution: int, num: int = 100) -> float:
  """The random arch's mean MACs as a share of the largest's (``num`` seeded samples)."""
  largest = float(model.cost(space.largest(), resolution)[0])
  return float(np.mean([float(model.cost(space.sample(jax.random.key(i)), resolution)[0])
                        for i in range(num)]) / largest)


def macs_shares(model, space, steps, resolution: int) -> dict:
  """Each step's MACs as a share of the largest step's (sandwich4: the sum of its subnets)."""
  largest = float(model.cost(space.largest(), resolution)[0])
  share = lambda arch: float(model.cost(arch, resolution)[0]) / largest
  random = mean_macs_share(model, space, resolution) if {"random", "sandwich4"} & set(steps) else 0
  small = share(space.smallest())
  return {"largest": 1.0, "smallest": small, "middle": share(middle(space)), "random": random,
          "half": share(model.width_arch(0.5)) if "half" in steps else float("nan"),
          "sandwich4": 1.0 + small + 2 * random}


def only(arch) -> dict:
  """A restriction of every position of every leaf to ``arch``'s value there."""
  return {k: np.asarray(v)[..., None].tolist() for k, v in arch.items()}


def model_arguments(description: str) -> argparse.ArgumentParser:
  """A parser with the model, its options (JSON), resolution and batch (default: the default
  config's); :func:`model_setup` reads them."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--model", default="")
  p.add_argument("--options", default="{}", help="model options, JSON")
  p.add_argument("--resolution", type=int, default=0)
  p.add_argument("--batch", type=int, default=0)
  return p


def model_setup(args):
  """(the default config naming ``args.model``, its model options, resolution, batch)."""
  config = default.get_config()
  config.model = "ofa_mbv3_tiny"  # without --model: the supernet docs/benchmarks.md measured
  options = dict(config.model_options)
  if args.model and args.model != config.model:
    config.model, options = args.model, {}
  options.update(json.loads(args.options))
  return config, options, args.resolution or config.resolution, args.batch or config.batch_size


def main():
  p = model_arguments(__doc__.split("\n\n")[0])
  p.add_argument("--modes", default="masked,active")
  p.add_argument("--steps", default=",".join(DEFAULT_STEPS), help=f"some of {STEPS}")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="")
  args = p.parse_args()
  config, options, resolution, batch = model_setup(args)
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
                                   ("middle", plain, 1, only(middle(space))),
                                   ("random", plain, 1, {}),
                                   ("half", plain, 1, None),
                                   ("sandwich4", config, 4, {})):
      if name not in steps:
        continue
      restrict = only(model.width_arch(0.5)) if name == "half" else restrict
      warm = ()
      if mode == "active" and name in ("random", "sandwich4"):  # see build()
        rng = np.random.default_rng(0)
        warm = covering_archs(space) or [space.random_host(rng) for _ in range(8)]
      calls[mode, name], compile_s[mode, name] = build(cfg, model, space, n, restrict, batch,
                                                       resolution, warm)
  macs = macs_shares(model, space, steps, resolution)

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
  print(f"{'step':<12}{'MACs share':>11}" + "".join(
      f"{m + ' ms':>14}{'share':>7}{'compile s':>11}" for m in modes)
        + (f"{'speed-up':>10}" if len(modes) == 2 else ""))
  shape = {m: {} for m in modes}
  for name in steps:
    row = f"{name:<12}{macs[name]:>11.2f}"
    for m in modes:
      share = med[m, name] / med[m, "largest"] if "largest" in steps else float("nan")
      shape[m][name] = {"time_share": share, "over_macs_share": share / macs[name]}
      row += f"{1000 * med[m, name]:>14.1f}{share:>7.2f}{compile_s[m, name]:>11.1f}"
    if len(modes) == 2:
      row += f"{med[modes[0], name] / med[modes[1], name]:>9.2f}x"
    print(row)
  print("share: the step's time over the largest step's (sandwich4: PyTorch OFA 1.7, issue 13); "
        "MACs share: the same for MACs (random: the mean of 100 samples)")

  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"train_step_{config.model}_{resolution}_b{batch}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"model": config.model, "batch": batch, "resolution": resolution,
               "jax": jax.__version__, "device": str(jax.devices()[0]),
               "machine": platform.machine(), "cpus": os.cpu_count(),
               "macs_share": macs,
               "median_s": {f"{m}/{n}": v for (m, n), v in med.items()},
               "times_s": {f"{m}/{n}": v for (m, n), v in times.items()},
               "compile_s": {f"{m}/{n}": v for (m, n), v in compile_s.items()},
               "shape": shape}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
