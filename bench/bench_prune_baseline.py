"""The L1-pruning baseline for a searched classifier supernet: at each searched subnet's MACs,
the supernet's largest network pruned by filter L1 norm, then fine-tuned.

For each ``<workdir>/search/<name>/subnets/target_<macs>/`` (what search.py exports), rows on
the training run's test split, every one BN-calibrated as the search calibrates (its
config.json's calibration split, batch size, batch count and seed):

* ``supernet``: the searched subnet, as the search chose it;
* ``l1_pruned``: the largest network (full depth, the space's largest kernels) with every
  block's expanded channels pruned by OFA's L1 ranking (:mod:`ofajax.channel_sorting`, what
  ``prune.py`` ranks built-in CNNs by) to widths whose MACs match the subnet's (below), right
  after pruning;
* ``l1_finetuned``: that network fine-tuned for ``--epochs`` on the training run's own
  training split (the search's validation hold-out and the test split are never read);
* ``l1_distilled``: the same fine-tune with logit distillation from the unpruned largest
  network (``distill="teacher"``). The teacher is the trained workdir's largest subnet with its
  BN statistics calibrated for it (:func:`teacher_workdir`): a sandwich-trained supernet's
  stored running statistics average every subnet it sampled, and the default workdir's largest
  scores 47% on test with them (97% calibrated). ``load_teacher`` now calibrates any teacher
  (on the student config's ``eval.calib_*`` batches); this bench calibrates its teacher as the
  search calibrates, which is how the committed results were measured.

MACs matching. CompOFA's space ties the expand ratio to depth, so a full-depth network has no
narrower choice: pruning works in OFA's space over the same layers with every integer expand
ratio from 1 to the largest allowed (a block's middle width is ``make_divisible(in * expand,
8)``; the trained weights fit unchanged). Each block keeps ``lo`` or ``hi``, the two uniform
ratios whose MACs bracket the target; starting from all ``lo``, the block whose raise to ``hi``
brings MACs nearest the target is raised, until no raise brings them nearer (:func:`match_arch`:
within 1-2% at the default workdir's targets; the JSON records the gap).

Fine-tuning runs through ``ofajax.train`` (setup + loop; its final evaluation of the whole
space is skipped): the model is OFA's space as above, ``init_workdir`` the trained supernet,
and one phase restricted to the pruned arch that sorts the channels by L1 at its start (the
phase's ``sort_channels``: the same ranking as the pruning), so every step trains exactly the
pruned network, as the dense model would (the masked supernet at an arch computes what its
dense subnet does).

    PYTHONPATH=. python bench/bench_prune_baseline.py --workdir workdir/default
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from ofajax import channel_sorting, cost, evaluation, models, starting_weights
from ofajax import train as training
from ofajax.models import OFAMobileNetV3
from ofajax.workdir import Checkpoints, load_supernet, write_config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "prune_baseline.json")
# CompOFA's registry names and OFA's for the same layers (train.py needs OFA's space).
OFA_NAMES = {"compofa_mbv3": "ofa_mbv3", "compofa_mbv3_tiny": "ofa_mbv3_tiny",
             "ofa_mbv3": "ofa_mbv3", "ofa_mbv3_tiny": "ofa_mbv3_tiny"}


# --------------------------------------------------------------------------- pruned arch


def fine_expand(model: OFAMobileNetV3) -> tuple[int, ...]:
  """Every integer expand ratio up to the model's largest: widths in steps of a block's input."""
  return tuple(range(1, max(model.expand_choices) + 1))


def pruning_model(sup) -> OFAMobileNetV3:
  """The trained supernet's layers with OFA's space and every integer expand ratio."""
  if sup.config.model not in OFA_NAMES:
    raise ValueError(f"this bench prunes OFA MobileNetV3 supernets ({sorted(OFA_NAMES)}), not "
                     f"{sup.config.model!r}")
  model = sup.model.clone(parent=None, expand_choices=fine_expand(sup.model))
  return models.with_execution(model, "masked")


def match_arch(model: OFAMobileNetV3, largest: dict, target_macs: float, resolution: int):
  """(arch, MACs): ``largest`` with each block's expand ratio lowered to ``lo`` or ``hi`` (the
  uniform ratios bracketing ``target_macs``), blocks raised from ``lo`` one at a time, each time
  the one that brings MACs nearest the target, while a raise brings them nearer."""
  space = model.search_space()
  base = {k: np.array(v) for k, v in space.to_host(largest).items()}
  macs = lambda a: cost.count(model, a, resolution)["macs"]  # noqa: E731
  uniform = lambda e: {**base, "expand": np.full_like(base["expand"], e)}  # noqa: E731
  choices = sorted(model.expand_choices)
  below = [e for e in choices if macs(uniform(e)) <= target_macs]
  lo = below[-1] if below else choices[0]
  hi = next((e for e in choices if e > lo), lo)
  arch, best = uniform(lo), macs(uniform(lo))
  live = [(s, i) for s in range(base["depth"].shape[0]) for i in range(int(base["depth"][s]))]
  while True:
    trials = []
    for pos in (p for p in live if arch["expand"][p] == lo and hi != lo):
      trial = {**arch, "expand": arch["expand"].copy()}
      trial["expand"][pos] = hi
      trials.append((abs(macs(trial) - target_macs), macs(trial), trial))
    if not trials or min(t[0] for t in trials) >= abs(best - target_macs):
      return arch, best
    _, best, arch = min(trials, key=lambda t: t[0])


# --------------------------------------------------------------------------- fine-tune


def finetune_config(train_config, workdir: str, model: OFAMobileNetV3, arch: dict, epochs: float,
                    learning_rate: float, teacher: str = "") -> ml_collections.ConfigDict:
  """The training config that fine-tunes ``arch`` of ``model`` (:func:`pruning_model`) from
  ``workdir``'s weights, channels L1-sorted at the start (see the module docstring), distilled
  from the largest subnet of the workdir ``teacher`` when given."""
  c = ml_collections.ConfigDict(train_config.to_dict())
  c.model = OFA_NAMES[c.model]
  c.model_options.expand_choices = tuple(model.expand_choices)
  c.execution = "masked"   # one arch: active execution would only add its branch switches
  c.init_workdir = workdir
  c.distill, c.teacher_workdir = ("teacher", teacher) if teacher else ("none", "")
  c.num_epochs = float(epochs)
  restrict = {k: np.asarray(v)[..., None].tolist() for k, v in arch.items()}
  c.phases = [ml_collections.ConfigDict({
      "name": "finetune", "epochs": float(epochs), "learning_rate": learning_rate,
      "warmup_epochs": 0.0, "num_subnets": 1, "sampling": "random", "restrict": restrict,
      "sort_channels": True})]
  c.stop_after_steps = 0
  c.checkpoint_every_steps = 10**9   # the end only
  c.keep_checkpoints = 1
  return c


def teacher_workdir(sup, search_config: dict, out: str) -> str:
  """A workdir holding ``sup`` with BN statistics calibrated for its largest subnet (calibrated
  as the search calibrates), for ``config.teacher_workdir``."""
  shutil.rmtree(out, ignore_errors=True)
  train = sup.config
  calib = ml_collections.ConfigDict(train.to_dict())
  calib.train_split = search_config["calib_split"] or train.train_split
  calib.seed = search_config["seed"]
  calib.eval.calib_batch_size = search_config["calib_batch_size"]
  calib.eval.calib_batches = search_config["calib_batches"]
  stats = starting_weights.calibrated_teacher(sup, calib)["batch_stats"]
  write_config(out, train)
  ckpt = Checkpoints(out, keep=1)
  ckpt.save(sup.step, {"params": sup.variables["params"], "batch_stats": stats},
            {"step": sup.step, "note": "largest subnet's BN statistics calibrated"})
  ckpt.close()
  return out


def finetune(config, out: str) -> dict:
  """Fine-tunes through ofajax.train into a fresh ``out``; returns the variables."""
  shutil.rmtree(out, ignore_errors=True)
  run = training.setup(config, out)
  if not training.train_loop(run):
    raise RuntimeError(f"fine-tuning in {out} stopped before the end of its schedule")
  return jax.device_get(run.state.variables)


# --------------------------------------------------------------------------- evaluation


def test_top1(model, variables, arch, train_config, search_config) -> float:
  """Test top-1 of ``arch`` after BN calibration as the search calibrates."""
  evaluator = evaluation.make_evaluator(
      model, variables, dataset=train_config.dataset, data_dir=train_config.data_dir or None,
      resolution=int(train_config.resolution),
      calib_split=search_config["calib_split"] or train_config.train_split,
      calib_batch_size=search_config["calib_batch_size"],
      calib_batches=search_config["calib_batches"], seed=search_config["seed"] + 1,
      split=search_config["test_split"] or train_config.test_split,
      batch_size=search_config["valid_batch_size"], chunk_size=1, archs_per_call=1)
  return float(evaluator([arch])[0]["top1"])


def row(name, model, arch, top1, resolution, epochs, seconds, **extra) -> dict:
  c = cost.count(model, arch, resolution)
  return {"name": name, "macs": int(c["macs"]), "params": int(c["params"]), "top1": top1,
          "finetune_epochs": epochs, "seconds": round(seconds, 1),
          "arch": {k: np.asarray(v).tolist() for k, v in arch.items()}, **extra}


def targets(workdir: str, search: str, space) -> list[tuple[str, dict]]:
  """(label, arch) of every exported subnet, smallest target first."""
  subnets = os.path.join(workdir, "search", search, "subnets")
  labels = sorted(os.listdir(subnets), key=lambda s: int(s.split("_")[-1]))
  out = []
  for label in labels:
    with open(os.path.join(subnets, label, "arch.json")) as f:
      out.append((label, space.to_host(space.from_json(f.read()))))
  return out


def main(args) -> list[dict]:
  sup = load_supernet(args.workdir)
  with open(os.path.join(args.workdir, "search", args.search, "config.json")) as f:
    search_config = json.load(f)
  resolution = int(sup.config.resolution)
  variables = jax.device_get(sup.variables)
  searched_model = models.with_execution(sup.model, "masked")
  pruner = pruning_model(sup)
  ranked = channel_sorting.sort_channels(pruner, variables)   # prune.py's built-in ranking
  largest = sup.space.to_host(sup.space.largest())   # the trained space's largest network
  evaluate = lambda m, v, a: test_top1(m, v, a, sup.config, search_config)  # noqa: E731
  teacher = (teacher_workdir(sup, search_config, os.path.join(args.work, "teacher"))
             if args.distill else "")
  rows = []
  for label, arch in targets(args.workdir, args.search, sup.space):
    start = time.time()
    searched = row("supernet", searched_model, arch, evaluate(searched_model, variables, arch),
                   resolution, 0, time.time() - start, target=label)
    rows.append(searched)
    start = time.time()
    pruned_arch, macs = match_arch(pruner, largest, searched["macs"], resolution)
    gap = round(macs / searched["macs"] - 1, 4)
    rows.append(row("l1_pruned", pruner, pruned_arch, evaluate(pruner, ranked, pruned_arch),
                    resolution, 0, time.time() - start, target=label, macs_gap=gap))
    runs = [("l1_finetuned", "")] + [("l1_distilled", teacher)] * args.distill
    for name, teacher_dir in runs:
      start = time.time()
      config = finetune_config(sup.config, args.workdir, pruner, pruned_arch, args.epochs, args.lr,
                               teacher_dir)
      tuned = finetune(config, os.path.join(args.work, f"{label}_{name}"))
      rows.append(row(name, pruner, pruned_arch, evaluate(pruner, tuned, pruned_arch),
                      resolution, args.epochs, time.time() - start, target=label, macs_gap=gap,
                      learning_rate=args.lr))
    for r in rows[-2 - len(runs):]:
      print(json.dumps({k: v for k, v in r.items() if k != "arch"}), flush=True)
  print_table(rows)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"workdir": os.path.abspath(args.workdir), "search": args.search,
                 "model": sup.model_name, "test_split": search_config["test_split"]
                 or sup.config.test_split, "epochs": args.epochs, "learning_rate": args.lr,
                 "cores": os.cpu_count(), "rows": rows}, f, indent=1)
    print(f"results in {args.out}")
  return rows


def print_table(rows: list[dict]) -> None:
  head = ["target", "name", "MACs", "params", "top-1", "epochs", "seconds"]
  lines = [head] + [[r["target"], r["name"], f"{r['macs']:,}", f"{r['params']:,}",
                     f"{100 * r['top1']:.1f}%", str(r["finetune_epochs"]), f"{r['seconds']:.0f}"]
                    for r in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  print("\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a training workdir searched by search.py")
  p.add_argument("--search", default="autoslim", help="<workdir>/search/<this>/subnets/")
  p.add_argument("--epochs", type=float, default=3.0, help="fine-tune epochs per pruned model")
  p.add_argument("--lr", type=float, default=0.01, help="fine-tune peak learning rate (cosine)")
  p.add_argument("--distill", type=int, default=1, choices=[0, 1],
                 help="1: also fine-tune with logit distillation from the unpruned network")
  p.add_argument("--work", default="/tmp/prune_baseline", help="fine-tune workdirs go here")
  p.add_argument("--out", default=RESULTS)
  return p.parse_args(argv)


if __name__ == "__main__":
  main(parse_args())
