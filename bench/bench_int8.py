"""int8 against float32 for the subnets a search exported: test top-1, artifact size, CPU latency.

For each ``<workdir>/search/<name>/subnets/<label>/`` the float subnet is read back (orbax
variables + arch.json), quantized with :func:`ofajax.quantize.quantize` (activation ranges from
the search's own calibration batches: its config.json's calib split, batch size, count and seed),
and both are saved as StableHLO (the float one again, as the search saves it: both files then
come from this exporter, whichever version wrote the search's) and loaded back with
:func:`ofajax.export.load_stablehlo`: what is measured is what a server runs. Each file's bytes
are broken down as ``bench/artifact_bytes.py`` does. Top-1 on the training run's test split; latency of the jitted
artifacts at each ``--batch``, warmed up, the two models alternating round by round (median over
rounds of the mean time per call within a round).

    PYTHONPATH=. python bench/bench_int8.py --workdir workdir/default
    PYTHONPATH=. python bench/bench_int8.py --workdir workdir/default --depthwise int8 \
        --out bench/results/int8_depthwise_int8.json   # depthwise convs as int8 ops too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from ofajax import evaluation, export, quantize
from ofajax.search.int8 import top1
from ofajax.workdir import load_supernet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from artifact_bytes import breakdown  # noqa: E402  (a sibling script, not a package)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a training workdir searched by search.py")
  p.add_argument("--search", default="autoslim", help="<workdir>/search/<this>/subnets/")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
  p.add_argument("--depthwise", default="float", choices=["float", "int8"],
                 help="quantize.quantize's depthwise: float ops on int8 kernels, or int8 ops")
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--seconds", type=float, default=0.2, help="timed per model per round")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "int8.json"))
  args = p.parse_args()

  sup = load_supernet(args.workdir)
  search_dir = os.path.join(args.workdir, "search", args.search)
  with open(os.path.join(search_dir, "config.json")) as f:
    search_config = json.load(f)
  tmp = tempfile.mkdtemp(prefix="bench-int8-")
  rows = []
  subnets = os.path.join(search_dir, "subnets")
  for label in sorted(os.listdir(subnets), key=lambda s: int(s.split("_")[-1])):
    row = measure(sup, os.path.join(subnets, label), search_config, tmp, args)
    rows.append(dict(label=label, **row))
    print(json.dumps(rows[-1]), flush=True)
  print_table(rows, args.batch)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"workdir": os.path.abspath(args.workdir), "search": args.search,
               "model": sup.model_name, "device": jax.devices()[0].device_kind,
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "depthwise": args.depthwise, "rounds": args.rounds, "subnets": rows}, f, indent=1)
  print(f"results in {args.out}")


def measure(sup, path: str, search_config: dict, tmp: str, args) -> dict:
  """Top-1, bytes and latency of one exported subnet, float32 and int8."""
  with open(os.path.join(path, "arch.json")) as f:
    arch = sup.space.from_json(f.read())
  with open(os.path.join(path, "summary.json")) as f:
    resolution = json.load(f)["resolution"]
  model = sup.model.dense_model(arch)
  with ocp.StandardCheckpointer() as ckpt:
    variables = ckpt.restore(os.path.abspath(os.path.join(path, "variables")))
  train = sup.config
  calib = evaluation.calibration_inputs(
      train.dataset, search_config["calib_split"] or train.train_split, train.data_dir or None,
      search_config["calib_batch_size"], search_config["calib_batches"],
      search_config["seed"] + 1, resolution)
  files = {k: os.path.join(tmp, f"{os.path.basename(path)}.{k}.stablehlo")
           for k in ("float32", "int8")}
  export.save_stablehlo(model, variables, files["float32"], resolution)
  quantize.save_stablehlo(quantize.quantize(model, variables, calib, depthwise=args.depthwise),
                          files["int8"], resolution)
  fns = {k: jax.jit(export.load_stablehlo(f)) for k, f in files.items()}
  split = search_config["test_split"] or train.get("test_split", "test")
  out = {"name": sup.space.name(arch), "resolution": resolution}
  for k, fn in fns.items():
    _, batches = evaluation.eval_batches(train.dataset, split, train.data_dir or None, 250,
                                         resolution)
    out[f"{k}_test_top1"] = top1(fn, batches)
    out[f"{k}_bytes"] = os.path.getsize(files[k])
    out[f"{k}_breakdown"] = breakdown(files[k])
  out["top1_drop_points"] = 100 * (out["float32_test_top1"] - out["int8_test_top1"])
  out["size_ratio"] = out["int8_bytes"] / out["float32_bytes"]
  x = calib.reshape(-1, *calib.shape[2:])
  for b in args.batch:
    ms = latency(fns, np.ascontiguousarray(x[:b]), args.rounds, args.seconds)
    out.update({f"{k}_ms_b{b}": v for k, v in ms.items()})
    out[f"int8_over_float_b{b}"] = ms["int8"] / ms["float32"]
  return out


def latency(fns: dict, x, rounds: int, seconds: float) -> dict:
  """{model: median over rounds of ms per call}; models alternate within each round."""
  x = jax.device_put(x)
  calls = {}
  for k, fn in fns.items():  # compile, warm up, and size a round to ~``seconds``
    fn(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(3):
      fn(x).block_until_ready()
    calls[k] = max(1, int(seconds / ((time.perf_counter() - t) / 3)))
  times = {k: [] for k in fns}
  for r in range(rounds):
    for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      t = time.perf_counter()
      for _ in range(calls[k]):
        fns[k](x).block_until_ready()
      times[k].append(1e3 * (time.perf_counter() - t) / calls[k])
  return {k: float(np.median(v)) for k, v in times.items()}


def print_table(rows: list[dict], batches) -> None:
  head = ["subnet", "float top-1", "int8 top-1", "drop (pts)", "float KB", "int8 KB", "ratio"]
  for b in batches:
    head += [f"float ms b{b}", f"int8 ms b{b}", f"int8/float b{b}"]
  lines = [head]
  for r in rows:
    cells = [r["label"], f"{100 * r['float32_test_top1']:.2f}%", f"{100 * r['int8_test_top1']:.2f}%",
             f"{r['top1_drop_points']:+.2f}", f"{r['float32_bytes'] / 1e3:.0f}",
             f"{r['int8_bytes'] / 1e3:.0f}", f"{r['size_ratio']:.2f}x"]
    for b in batches:
      cells += [f"{r[f'float32_ms_b{b}']:.3f}", f"{r[f'int8_ms_b{b}']:.3f}",
                f"{r[f'int8_over_float_b{b}']:.2f}x"]
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  print("\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines))


if __name__ == "__main__":
  main()
