"""Where a train step's time goes, per part of the network and per kind of operation.

Traces a few steps with ``jax.profiler`` (a Perfetto trace: every XLA:CPU kernel the step runs,
with its duration) and attributes each kernel to what produced it, through the optimized HLO's
``op_name`` metadata (Flax's module path, and ``transpose(jvp(...))`` for the backward pass):

* by part: the block layer (``expand``, ``depthwise``, ``depthwise_bn``, ``se``, ``project``,
  the stem, the head, ...), forward or backward, and the optimizer update;
* by kind: convolution / dot, the shifted depthwise multiply-adds, reductions (BatchNorm
  statistics, kernel gradients), elementwise, copies and layout changes.

    PYTHONPATH=. python bench/profile_train_step.py --model ofa_mbv3 --resolution 128 --batch 32
    PYTHONPATH=. python bench/profile_train_step.py --step sandwich4   # default tiny net

Prints two tables (share of the traced kernel time) and writes JSON under ``bench/results/``.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

# Per-thunk trace events; set before JAX starts its backend. Only this script traces.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402  (after XLA_FLAGS)

sys.path.insert(0, os.path.dirname(__file__))
import bench_train_step as bench  # noqa: E402
from configs import default  # noqa: E402
from ofajax import models  # noqa: E402

# The parts of a block and of a network, as Flax names them in the op_name path (the last match
# wins, so "depthwise_bn" beats "depthwise").
PARTS = ("stem", "first_block", "expand", "depthwise", "depthwise_bn", "se", "project",
         "final_expand", "feature_mix", "head", "classifier")
KINDS = (("convolution", r"convolution"), ("dot (1x1 convs, dense)", r"\bdot\b|dot_general"),
         ("depthwise taps", r"multiply_add|add_multiply"),
         ("reduce (BN stats, kernel grads)", r"reduce"),
         ("copy / transpose / pad", r"copy|transpose|pad|concatenate|slice|bitcast"),
         ("elementwise", r"."))


# Control-flow thunks: their events span the kernels they run, which have events of their own.
CONTAINERS = re.compile(r"^(cond|conditional|while|call)(\.|$)")


def fusion_metadata(hlo_text: str) -> dict[str, str]:
  """Instruction name -> its op_name (the JAX name stack) from optimized HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
    if m:
      out.setdefault(m.group(1), m.group(2))
  return out


def part_of(op_name: str) -> str:
  """``"optimizer"`` outside the model, else the network part, with "backward" for
  transposes."""
  if "transpose(jvp(" not in op_name and "jvp(" not in op_name and "Elastic" not in op_name \
     and "/params" not in op_name and not any(f"/{p}" in op_name for p in PARTS):
    return "optimizer update / other"
  found = "other layers"
  for part in PARTS:
    if re.search(rf"/{part}(/|$|_\d)", op_name) or re.search(rf"/{part}\b", op_name):
      found = part
  direction = "backward" if "transpose(" in op_name else "forward"
  return f"{found} ({direction})"


def kind_of(kernel: str) -> str:
  for kind, pattern in KINDS:
    if re.search(pattern, kernel):
      return kind
  return "elementwise"


def trace_events(log_dir: str) -> list[dict]:
  path = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
  path = path or glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not path:
    raise FileNotFoundError(f"no trace JSON under {log_dir}")
  with gzip.open(path[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def main():
  p = bench.model_arguments(__doc__.split("\n\n")[0])
  p.add_argument("--execution", default="active")
  p.add_argument("--step", default="largest", choices=("largest", "smallest", "sandwich4"))
  p.add_argument("--traced_steps", type=int, default=2)
  p.add_argument("--top", type=int, default=12, help="also list the costliest kernels")
  p.add_argument("--out", default="")
  args = p.parse_args()
  config, options, resolution, batch = bench.model_setup(args)
  options["execution"] = args.execution
  model, space = models.get(config.model, **options)
  plain = default.get_config()
  plain.distill = "none"
  cfg, num, restrict = {"largest": (plain, 1, bench.only(space.largest())),
                        "smallest": (plain, 1, bench.only(space.smallest())),
                        "sandwich4": (config, 4, {})}[args.step]
  warm = bench.covering_archs(space) if args.step == "sandwich4" else ()
  call, _ = bench.build(cfg, model, space, num, restrict, batch, resolution, warm)
  compiled_text = call.compiled.as_text()

  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(args.traced_steps):
        call()
    events = trace_events(log_dir)
  meta = fusion_metadata(compiled_text)
  by_part, by_kind, by_kernel = (collections.Counter(), collections.Counter(),
                                 collections.Counter())
  for e in events:
    name = e["name"]
    if name not in meta or CONTAINERS.match(name):
      continue   # host-side events (Python, PjRt), or a thunk whose kernels are traced inside

    by_part[part_of(meta[name])] += e["dur"]
    by_kind[kind_of(name)] += e["dur"]
    by_kernel[name] += e["dur"]
  total = sum(by_part.values())
  print(f"{config.model} ({args.execution}), {args.step} step, batch {batch}, {resolution}px, "
        f"{args.traced_steps} traced steps: {total / 1e3 / args.traced_steps:.0f} ms of kernels "
        "per step")
  tables = {}
  for title, counts in (("part", by_part), ("kind", by_kind)):
    print(f"\n{'by ' + title:<44}{'ms/step':>10}{'share':>8}")
    rows = []
    for key, us in counts.most_common():
      ms = us / 1e3 / args.traced_steps
      rows.append({"name": key, "ms_per_step": ms, "share": us / total})
      print(f"{key:<44}{ms:>10.1f}{us / total:>8.1%}")
    tables[title] = rows
  print(f"\n{'costliest kernels':<44}{'ms/step':>10}{'share':>8}  op_name")
  tables["kernels"] = []
  for name, us in by_kernel.most_common(args.top):
    ms = us / 1e3 / args.traced_steps
    tables["kernels"].append({"name": name, "ms_per_step": ms, "share": us / total,
                              "op_name": meta[name]})
    print(f"{name[:44]:<44}{ms:>10.1f}{us / total:>8.1%}  {meta[name][-90:]}")
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"profile_{config.model}_{args.execution}_{args.step}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"model": config.model, "execution": args.execution, "step": args.step,
               "batch": batch, "resolution": resolution, "jax": jax.__version__,
               "kernel_ms_per_step": total / 1e3 / args.traced_steps, **tables}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
