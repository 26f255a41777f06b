"""GAN compression, stage 3: an OFA-style supernet over the pruned generator's channels.

The stage-2 generator (pruned + distilled) made elastic: every channel group of it (the trunk,
each block's inner width, the up path) may keep 50%, 75% or all of its channels. Trained
with the sandwich rule (largest, smallest, one random subnet per step) from the stage-2 weights
(``config.init_workdir``), each subnet distilled from the stage-2 generator's features (the
teacher, GAN Compression's setting) besides the GAN objective. Then
``python search.py --config configs/search/gan.py --workdir ...`` picks subnets under MACs
budgets by their Fréchet distance on the validation images.

  python train.py --config configs/gan_supernet.py --workdir /tmp/gan/supernet \\
      --config.teacher_workdir=/tmp/gan/pruned --config.init_workdir=/tmp/gan/pruned \\
      --config.model_options.factory_options.weights=/tmp/gan/pruned_weights/pruned.msgpack
"""

import ml_collections

from configs import gan_pruned


def get_config():
  c = gan_pruned.get_config()
  # Not 0.25: a quarter of the pruned generator leaves 2-4 channel layers; with it in the
  # space the smallest subnet scored a Frechet distance of 945 (the largest: 4.6).
  c.model_options.widths = (0.5, 0.75, 1.0)
  c.num_epochs = 8.0
  c.phases = [ml_collections.ConfigDict({
      "name": "sandwich", "epochs": c.get_ref("num_epochs"),
      "learning_rate": c.get_ref("learning_rate"), "warmup_epochs": 0.0, "num_subnets": 3,
      "sampling": "sandwich", "restrict": {}})]
  c.eval.num_random_subnets = 4
  return c
