"""Search engine throughput: candidates scored per second, BN calibration included, batched
engine against the same archs scored one by one in a Python loop, masked and (where the model
has it) at active size (``engine.execution="active"``).

Both sides use the engine's compiled function (compiled before timing): the batched side scores
all archs in chunks of ``--chunk`` (``--archs_per_call`` of them vmapped), the loop side calls it
once per arch (chunk 1). Rounds alternate between the sides; medians are reported.

    PYTHONPATH=. python bench/bench_search_engine.py --workdir workdir/default
    PYTHONPATH=. python bench/bench_search_engine.py            # untrained default supernet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from configs import default
from configs.search import common
from ofajax import data, models
from ofajax.evaluation import Evaluator
from ofajax.search.run import search_evaluator
from ofajax.workdir import TrainedSupernet, load_supernet


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="", help="a training workdir (default: untrained default "
                 "supernet; timing does not depend on the weights)")
  p.add_argument("--num_archs", type=int, default=32)
  p.add_argument("--chunk", type=int, default=8)
  p.add_argument("--archs_per_call", type=int, nargs="+", default=[1, 4])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "search_engine.json"))
  args = p.parse_args()

  search_config = common.base_config("bench", "greedy")
  if args.workdir:
    sup = load_supernet(args.workdir)
    train_config, model, space, variables = sup.config, sup.model, sup.space, sup.variables
  else:
    train_config = default.get_config()
    train_config.model = "ofa_mbv3_tiny"  # the supernet docs/search.md measured
    data.ensure_local_dataset(train_config.dataset, None)
    model, space = models.get(train_config.model, **dict(train_config.model_options))
    variables = models.init(model, jax.random.key(0),
                            models.sample_input(model, train_config.resolution))
  # Calibration and validation batches as search reads them, shared by every side.
  sup = TrainedSupernet(train_config, model, space, variables, 0, args.workdir)
  search_data = search_evaluator(search_config, sup, search_config.valid_split)
  rng = np.random.default_rng(0)
  archs = [space.random_host(rng) for _ in range(args.num_archs)]
  side = lambda chunk, apc, execution="masked": Evaluator(
      models.with_execution(model, execution), variables, search_data.calib_inputs,
      search_data.eval_batches, search_data.num_examples, chunk, apc)

  sides = {"one by one": side(1, 1)}
  if "active" in model.executions:   # engine.execution="active": each arch at its own size
    sides["one by one, active"] = side(1, 1, "active")
  for apc in args.archs_per_call:
    sides[f"batched (chunk {args.chunk}, vmap {apc})"] = side(args.chunk, apc)
  compile_s = {}
  for name, ev in sides.items():
    t0 = time.perf_counter()
    ev(archs[:ev.chunk_size])
    compile_s[name] = time.perf_counter() - t0

  def run(ev):
    if ev.chunk_size == 1:
      return [ev([a])[0] for a in archs]   # the Python loop
    return ev(archs)

  times = {name: [] for name in sides}
  scores = {}
  for _ in range(args.rounds):
    for name, ev in sides.items():
      t0 = time.perf_counter()
      scores[name] = run(ev)
      times[name].append(time.perf_counter() - t0)
  base = np.median(times["one by one"])
  # Different batching lets XLA fuse differently: losses may differ in the last bits, top-1
  # (a count of argmax hits) should not.
  same = all([x["top1"] for x in s] == [x["top1"] for x in scores["one by one"]]
             for s in scores.values())
  loss_diff = max(abs(a["loss"] - b["loss"]) for s in scores.values()
                  for a, b in zip(s, scores["one by one"]))
  rows = []
  print(f"{train_config.model}, {args.num_archs} archs, calibration "
        f"{search_data.calib_inputs.shape[0]}x{search_data.calib_inputs.shape[1]} images, "
        f"validation {search_data.num_examples} images, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cpus; {args.rounds} interleaved rounds")
  print(f"{'engine':<28} {'first call s':>12} {'median s':>9} {'archs/s':>8} {'speed-up':>8}")
  for name in sides:
    med = float(np.median(times[name]))
    rows.append({"engine": name, "first_call_s": compile_s[name], "median_s": med,
                 "times_s": times[name], "archs_per_s": args.num_archs / med,
                 "speedup_vs_loop": base / med})
    print(f"{name:<28} {compile_s[name]:>12.1f} {med:>9.2f} {args.num_archs / med:>8.2f} "
          f"{base / med:>7.2f}x")
  print(f"identical top-1 on every side: {same}; largest loss difference {loss_diff:.2e}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"model": train_config.model, "num_archs": args.num_archs,
               "calib_images": int(np.prod(search_data.calib_inputs.shape[:2])),
               "valid_images": search_data.num_examples, "platform": platform.platform(),
               "device": str(jax.devices()[0]), "rows": rows, "identical_top1": same,
               "max_loss_difference": loss_diff}, f,
              indent=1)


if __name__ == "__main__":
  main()
