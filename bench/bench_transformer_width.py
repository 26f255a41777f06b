"""Width against cost of the elastic transformers: do their dense subnets get faster with MACs?

For each model, builds the dense subnets at DynaBERT's width multipliers (default 100%, 75%,
50%, 25% of every layer's heads and FFN neurons, full depth: ``model.width_arch(f)``), sliced
from randomly initialised supernet variables (``dense_model`` + ``slice_variables``; weights do
not change the time), and reports analytic MACs and params (``ofajax.cost.count``) with the
measured latency of the jitted dense forward (eval mode) at each batch size.

Timing: every function is compiled ahead of time (compile excluded) and warmed up; then the widths
are interleaved round by round, the order reversed every other round (ABBA), so machine noise hits
them alike. A sample is ``inner`` back-to-back calls ended by ``block_until_ready``, ``inner``
chosen from the warmup so that a sample of the widest subnet lasts >= ``--sample-ms``; each cell
reports the median (and IQR) per call over ``--rounds`` samples.

    PYTHONPATH=. python bench/bench_transformer_width.py              # elastic_vit_mnist + elastic_bert
    PYTHONPATH=. python bench/bench_transformer_width.py --models elastic_bert \\
        --set elastic_bert:hidden_dim=384 --set elastic_bert:num_heads=6 --batches 1,8
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import jax
import numpy as np

from ofajax import cost, models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_masking import device_info, summarize, table  # noqa: E402

# elastic_bert at a size a CPU can time in minutes: 4 layers of 256 (4 heads), FFN 1024.
DEFAULT_OPTIONS = {
    "elastic_bert": dict(hidden_dim=256, num_layers=4, num_heads=4, ffn_dim=1024, ffn_step=256,
                         min_ffn_dim=256, min_heads=1, vocab_size=8192, max_length=128,
                         depth_choices=(2, 3, 4), resolutions=(128,)),
}
DEFAULT_RESOLUTION = {"elastic_vit_mnist": 28, "elastic_bert": 128}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="elastic_vit_mnist,elastic_bert",
                 help="comma-separated registry names of elastic transformers")
  p.add_argument("--set", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                 help="model option (Python literal), e.g. elastic_bert:num_layers=6; without "
                      "MODEL: every selected model; repeatable. elastic_bert's defaults: "
                      f"{DEFAULT_OPTIONS['elastic_bert']}")
  p.add_argument("--resolution", type=int, default=0,
                 help="image side / sequence length (default: per model, "
                      f"{DEFAULT_RESOLUTION})")
  p.add_argument("--widths", default="1,0.75,0.5,0.25", help="width multipliers")
  p.add_argument("--batches", default="1,32", help="batch sizes")
  p.add_argument("--rounds", type=int, default=15, help="timed samples per cell")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per function")
  p.add_argument("--sample-ms", type=float, default=20.0,
                 help="a sample repeats the call until the widest subnet takes this long")
  p.add_argument("--platform", default="", help="JAX platform (default: JAX's choice)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "transformer_width.json"))
  args = p.parse_args(argv)
  args.models = [m.strip() for m in args.models.split(",") if m.strip()]
  args.widths = [float(w) for w in args.widths.split(",")]
  args.batches = [int(b) for b in args.batches.split(",")]
  args.options = {m: dict(DEFAULT_OPTIONS.get(m, {})) for m in args.models}
  for item in args.set:
    target_key, eq, value = item.partition("=")
    target, _, key = target_key.rpartition(":")
    if not eq:
      p.error(f"--set {item!r}: expected [MODEL:]KEY=VALUE")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass   # a bare string, e.g. depth_rule=spread
    for m in [target] if target else args.models:
      if m not in args.options:
        p.error(f"--set {item!r}: {m} is not among --models {args.models}")
      args.options[m][key] = value
  if args.rounds < 1 or not args.widths or not args.batches:
    p.error("need --rounds >= 1, some --widths and some --batches")
  return args


def make_input(model, resolution: int, batch: int, rng):
  spec = models.input_spec(model, resolution, batch)
  if models.takes_tokens(model):   # real tokens everywhere: no padding
    return rng.integers(1, model.vocab_size, spec.shape).astype(spec.dtype)
  return rng.standard_normal(spec.shape).astype(spec.dtype)


def time_cells(fns: list, inputs: list, args) -> list[list[float]]:
  """Per function, ``args.rounds`` per-call times (ms); functions interleaved, ABBA order."""
  for f, x in zip(fns, inputs):
    for _ in range(args.warmup):
      jax.block_until_ready(f(x))
  t = time.perf_counter()
  jax.block_until_ready(fns[0](inputs[0]))   # fns[0] is the widest
  inner = max(1, int(np.ceil(args.sample_ms / 1e3 / max(time.perf_counter() - t, 1e-6))))
  times = [[] for _ in fns]
  for r in range(args.rounds):
    order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
    for i in order:
      t = time.perf_counter()
      for _ in range(inner):
        out = fns[i](inputs[i])
      jax.block_until_ready(out)
      times[i].append((time.perf_counter() - t) * 1e3 / inner)
  return times


def bench_model(name: str, args, rng) -> list[dict]:
  model, space = models.get(name, **args.options[name])
  resolution = args.resolution or DEFAULT_RESOLUTION.get(name) or space.resolutions[-1]
  t0 = time.perf_counter()
  variables = models.init(model, jax.random.key(args.seed),
                          models.sample_input(model, resolution, 1))
  subnets = []
  for w in args.widths:
    arch = model.width_arch(w)
    dense = model.dense_model(arch)
    dense_vars = jax.device_put(model.slice_variables(variables, arch))
    fwd = jax.jit(lambda v, x, dense=dense: dense.apply(v, x, train=False))
    subnets.append((w, arch, dense_vars, fwd, cost.count(model, arch, resolution)))
  rows = []
  for batch in args.batches:
    x = jax.device_put(make_input(model, resolution, batch, rng))
    fns = [fwd.lower(v, x).compile() for _, _, v, fwd, _ in subnets]
    calls = [lambda x, f=f, v=v: f(v, x) for f, (_, _, v, _, _) in zip(fns, subnets)]
    times = time_cells(calls, [x] * len(calls), args)
    for (w, arch, _, _, c), ms in zip(subnets, times):
      rows.append({"model": name, "options": args.options[name], "resolution": resolution,
                   "width": w, "heads": int(arch["heads"][0]), "ffn": int(arch["ffn"][0]),
                   "depth": int(arch["depth"]), "batch": batch, "macs": c["macs"],
                   "params": c["params"], **summarize(np, ms)})
  for batch in args.batches:
    cells = [r for r in rows if r["batch"] == batch]
    full = max(cells, key=lambda r: r["macs"])
    for r in cells:
      r["macs_ratio"] = r["macs"] / full["macs"]
      r["latency_ratio"] = r["median_ms"] / full["median_ms"]
      r["ms_per_example"] = r["median_ms"] / batch
  print(f"{name}: {len(args.widths)} widths x {len(args.batches)} batches in "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  return rows


def falls_with_macs(cells: list[dict]) -> bool:
  """Whether the median latency strictly falls as MACs fall."""
  cells = sorted(cells, key=lambda r: -r["macs"])
  return all(a["median_ms"] > b["median_ms"] for a, b in zip(cells, cells[1:]))


def main(argv=None):
  args = parse_args(argv)
  if args.platform:
    jax.config.update("jax_platforms", args.platform)
  rng = np.random.default_rng(args.seed)
  load_before = os.getloadavg()
  wall0 = time.perf_counter()
  rows = [r for name in args.models for r in bench_model(name, args, rng)]
  header = ["model", "batch", "width", "heads", "ffn", "MMACs", "params", "ms/call (±IQR)",
            "MACs ratio", "latency ratio"]
  lines = [header] + [
      [r["model"], str(r["batch"]), f"{100 * r['width']:.0f}%", str(r["heads"]), str(r["ffn"]),
       f"{r['macs'] / 1e6:,.1f}", f"{r['params']:,}",
       f"{r['median_ms']:.3f} ±{r['iqr_ms']:.3f}", f"{r['macs_ratio']:.2f}",
       f"{r['latency_ratio']:.2f}"] for r in rows]
  print(f"\ndense subnets, {jax.devices()[0].device_kind}; MACs per example; median over "
        f"{args.rounds} interleaved rounds\n")
  print(table(lines, right=set(range(1, len(header)))))
  monotone = {}
  for name in args.models:
    for batch in args.batches:
      ok = falls_with_macs([r for r in rows if r["model"] == name and r["batch"] == batch])
      monotone[f"{name}/batch{batch}"] = ok
      print(f"{name} batch {batch}: latency falls with MACs: {'yes' if ok else 'NO'}")
  result = {"rows": rows, "latency_falls_with_macs": monotone,
            "device": {**device_info(jax), "jax_device": str(jax.devices()[0]),
                       "jax_version": jax.__version__},
            "loadavg_before_after": [load_before, os.getloadavg()],
            "args": {k: v for k, v in vars(args).items() if k != "set"},
            "wall_s": time.perf_counter() - wall0}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
