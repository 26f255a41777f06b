"""Elastic ViT on the 5,000-image MNIST sample, offline, 2 CPU cores (< 10 minutes).

A 6-layer, 64-wide ViT on 4x4 patches (``elastic_vit_mnist``: heads 1-4, FFN 64-256, depth
3-6) trained in DynaBERT's two stages in one run: width first (every layer kept), then width
and depth. Each step runs the sandwich rule (largest, smallest, one random subnet) with in-place
distillation from the largest subnet's logits (KL). AdamW, as transformers are usually trained.

DynaBERT's hidden-state and embedding MSE need a fixed teacher (``distill="teacher"``, see
configs/dynabert_sst2.py): in place, every subnet pulls the shared weights toward the trivial
solution of equal (collapsed) hidden states, and the largest subnet stopped learning (measured
here: its cross-entropy stayed at ln 10 for 260 steps).

  python train.py --config configs/elastic_vit_mnist.py --workdir /tmp/vit
  python search.py --config configs/search/evolution.py --workdir /tmp/vit
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.model = "elastic_vit_mnist"
  c.model_options = ml_collections.ConfigDict({"num_classes": 10, "depth_rule": "first"})

  c.optimizer = "adamw"
  c.learning_rate = 2e-3
  c.weight_decay = 0.05
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0

  c.distill = "inplace"
  c.kd_loss = "kl"
  c.kd_temperature = 1.0

  # Subnets also learn from the labels: with the teacher's (near-uniform) early outputs alone,
  # the first 24-epoch run's largest subnet stayed near ln 10 cross-entropy for 100+ steps.
  c.inplace_ce_weight = 1.0
  c.num_epochs = 48.0
  width_epochs = 16.0
  c.phases = [
      ml_collections.ConfigDict({
          "name": "width", "epochs": width_epochs, "learning_rate": c.get_ref("learning_rate"),
          "warmup_epochs": 1.0, "num_subnets": 3, "sampling": "sandwich",
          "restrict": {"depth": [6]}}),
      ml_collections.ConfigDict({
          "name": "width_depth", "epochs": c.get_ref("num_epochs") - width_epochs,
          "learning_rate": c.get_ref("learning_rate"), "warmup_epochs": 0.0, "num_subnets": 3,
          "sampling": "sandwich", "restrict": {}}),
  ]
  # c.reorder.enabled re-orders heads and FFN neurons by importance before training; from a
  # random init that only permutes noise, so it is off here (it is on in dynabert_sst2.py,
  # which starts from a trained network: init_workdir).
  return c
