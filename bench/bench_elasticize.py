"""A user's plain CNN on the shipped MNIST sample: elasticized vs pruned by L1 at the same MACs.

1. **The user's model.** ``PlainCNN`` (below: three conv-BN-ReLU layers, global pooling, a
   hidden dense layer) trained the user's way (optax Adam, ``--pretrain_epochs``) on
   ``train[:-500]``.
2. **Elasticized.** ``ofajax.elasticize`` from those weights through the config path
   (``config.model = "elasticize"``, factory ``bench.bench_elasticize:plain_cnn``), channels
   sorted by importance at the start, then ``--epochs`` of the default recipe (sandwich rule,
   in-place distillation); greedy AutoSlim search for ``--targets`` (fractions of the full
   MACs) on the 500 held-out images; every chosen subnet's test top-1 (BN calibrated).
3. **L1 pruning baseline.** For each chosen subnet, the *original* trained CNN pruned to the
   same widths (so the same MACs) by filter L1 norm (Li et al., ICLR 2017), then fine-tuned
   alone for ``--finetune_epochs`` with the same optimizer as pretraining.

Prints a table (MACs, params, elastic top-1, pruned top-1) and writes JSON.

    PYTHONPATH=. python bench/bench_elasticize.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import ofajax
from configs import default
from configs.search import autoslim
from ofajax import cost, data, export
from ofajax.elastic import sorting
from ofajax.search.run import run_search
from ofajax.train import train_and_evaluate
from ofajax.workdir import load_supernet

DATASET, TRAIN, TEST = "mnist_5k", "train[:-500]", "test"


class PlainCNN(nn.Module):
  """The kind of CNN a user writes for MNIST; nothing in it knows about ofajax."""
  @nn.compact
  def __call__(self, x, train: bool = False):
    for features, stride in ((32, 1), (64, 2), (64, 2)):
      x = nn.Conv(features, (3, 3), stride, use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.relu(nn.Dense(64)(jnp.mean(x, axis=(1, 2))))
    return nn.Dense(10)(x)


def plain_cnn(weights: str = ""):
  """The factory the config names: (module, sample input[, trained variables])."""
  module, sample = PlainCNN(), jnp.zeros((1, 28, 28, 1))
  if not weights:
    return module, sample
  with open(weights, "rb") as f:
    return module, sample, flax.serialization.from_bytes(
        module.init(jax.random.key(0), sample), f.read())


def fit(apply, variables, epochs: float, lr: float, data_dir: str, seed: int = 0):
  """The user's own training loop: Adam with cosine decay, batch 128, MNIST augmentation."""
  source = data.load(DATASET, TRAIN, data_dir)
  steps = max(1, int(epochs * len(source) // 128))
  batches = data.make_train_iterator(source, batch_size=128, seed=seed, dataset=DATASET,
                                     augment="mnist")
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

  @jax.jit
  def step(variables, opt_state, images, labels):
    def loss(params):
      logits, state = apply({**variables, "params": params}, images, train=True,
                            mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state
    grads, state = jax.grad(loss, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return {"params": optax.apply_updates(variables["params"], updates), **state}, opt_state

  opt_state = tx.init(variables["params"])
  for _, batch in zip(range(steps), batches):
    variables, opt_state = step(variables, opt_state, batch["inputs"], batch["label"])
  return variables


def test_top1(apply, variables, data_dir: str) -> float:
  source = data.load(DATASET, TEST, data_dir)
  forward = jax.jit(lambda v, x: jnp.argmax(apply(v, x, train=False), -1))
  right = total = 0
  for batch in data.make_eval_iterator(source, batch_size=250, dataset=DATASET):
    mask = batch["mask"]
    right += float(jnp.sum((forward(variables, batch["inputs"]) == batch["label"]) * mask))
    total += float(jnp.sum(mask))
  return right / total


def elastic_config(weights: str, epochs: float, data_dir: str) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model = "elasticize"
  c.model_options = ml_collections.ConfigDict({
      "factory": "bench.bench_elasticize:plain_cnn", "factory_options": {"weights": weights},
      "widths": (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), "divisor": 4})
  c.data_dir, c.num_epochs = data_dir, epochs
  c.phases[0].sort_channels = True
  c.phases[0].warmup_epochs = 0.0     # it starts from trained weights
  c.learning_rate = 0.02              # a fine-tuning rate, for the same reason
  return c


def l1_pruned(supernet, space, user_variables, arch):
  """The original CNN cut to ``arch``'s widths, keeping each group's largest-L1 filters."""
  fresh = jax.eval_shape(lambda: supernet.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                               space.largest()))
  wrapped = ofajax.elastic.wrap_variables(user_variables, fresh)
  ranked = sorting.sort_channels(supernet, jax.device_get(wrapped), rank_by="filters")
  return export.extract_subnet(supernet, ranked, arch, space)


def main(args):
  data_dir = args.data_dir or None
  work = args.workdir or tempfile.mkdtemp(prefix="bench_elasticize_")
  os.makedirs(work, exist_ok=True)
  module, sample = plain_cnn()
  t0 = time.time()
  user_variables = fit(module.apply, module.init(jax.random.key(0), sample),
                       args.pretrain_epochs, 3e-3, data_dir)
  weights = os.path.join(work, "plain_cnn.msgpack")
  with open(weights, "wb") as f:
    f.write(flax.serialization.to_bytes(user_variables))
  original = test_top1(module.apply, user_variables, data_dir)
  t_pretrain = time.time() - t0

  workdir = os.path.join(work, "supernet")
  train_and_evaluate(elastic_config(weights, args.epochs, data_dir), workdir)
  search = autoslim.get_config()
  search.target_fractions = tuple(args.targets)
  result = run_search(search, workdir)
  t_elastic = time.time() - t0 - t_pretrain

  trained = load_supernet(workdir)
  supernet, space = trained.model, trained.space
  full = cost.count(supernet, space.largest(), 28)
  rows = []
  for row in result["chosen"]:
    arch = space.from_json(json.dumps(row["arch"]))
    dense, dense_variables = l1_pruned(supernet, space, user_variables, arch)
    pruned_before = test_top1(dense.apply, dense_variables, data_dir)
    tuned = fit(dense.apply, dense_variables, args.finetune_epochs, 1e-3, data_dir)
    rows.append({"target_fraction": row["target_macs"] / full["macs"], "macs": row["macs"],
                 "params": row["params"],
                 "elastic_top1": row["test_top1"], "l1_pruned_top1": test_top1(
                     dense.apply, tuned, data_dir), "l1_pruned_no_finetune_top1": pruned_before,
                 "arch": space.to_json(arch)})
  print(f"\nplain CNN: {full['macs']:,} MACs, {full['params']:,} params, test top-1 "
        f"{original:.2%} after {args.pretrain_epochs} epochs")
  print(f"{'MACs':>9} {'params':>7} {'elastic':>8} {'L1+ft':>7} {'L1 only':>8}")
  for r in rows:
    print(f"{r['macs']:>9,} {r['params']:>7,} {r['elastic_top1']:>8.2%} "
          f"{r['l1_pruned_top1']:>7.2%} {r['l1_pruned_no_finetune_top1']:>8.2%}")
  out = {"original_top1": original, "full": full, "rows": rows, "args": vars(args),
         "seconds": {"pretrain": t_pretrain, "elasticize_train_search": t_elastic,
                     "total": time.time() - t0}}
  os.makedirs("bench/results", exist_ok=True)
  with open("bench/results/elasticize.json", "w") as f:
    json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pretrain_epochs", type=float, default=15)
  parser.add_argument("--epochs", type=float, default=10, help="elastic training epochs")
  parser.add_argument("--finetune_epochs", type=float, default=10,
                      help="the L1-pruned baseline's fine-tuning (as many as elastic training)")
  parser.add_argument("--targets", type=float, nargs="+", default=(0.6, 0.35, 0.2))
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--workdir", default="")
  main(parser.parse_args())
