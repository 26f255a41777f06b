"""GAN compression, stage 1: the original pix2pix ResNet generator on edges -> digit, offline.

The paired task (``ofajax.gan.data``): a binary Sobel edge map of each image of the 5,000-image
MNIST sample in, the digit out, 28x28x1 in [-1, 1]. The generator is the pix2pix / CycleGAN
ResNet generator scaled to 28x28 (``ofajax.models.generators.ResnetGenerator``: 7x7 stem, two
stride-2 downsamplings, ``n_blocks`` residual blocks, two transposed-conv upsamplings, 7x7 head,
tanh) against a conditional PatchGAN discriminator. pix2pix's objective: LSGAN + 100 x L1, Adam
(beta1 0.5), learning rate 2e-4 decayed linearly to 0. The last 500 training images are held
out (validation for the search), as in the classifier configs.

The generator goes through ``ofajax.elasticize`` with a single width (1.0), so it trains as a
supernet with one subnet: the same job, checkpoints and search tools as the later stages.

  python train.py --config configs/gan_resnet.py --workdir /tmp/gan/resnet
  python train.py --config configs/gan_mobile.py --workdir /tmp/gan/mobile
  python prune.py --workdir /tmp/gan/mobile --out /tmp/gan/pruned_weights
  python train.py --config configs/gan_pruned.py --workdir /tmp/gan/pruned \\
      --config.teacher_workdir=/tmp/gan/mobile \\
      --config.model_options.factory_options.weights=/tmp/gan/pruned_weights/pruned.msgpack
  python train.py --config configs/gan_supernet.py --workdir /tmp/gan/supernet \\
      --config.teacher_workdir=/tmp/gan/pruned --config.init_workdir=/tmp/gan/pruned \\
      --config.model_options.factory_options.weights=/tmp/gan/pruned_weights/pruned.msgpack
"""

import ml_collections

from configs import default


def generator_options(factory: str, **factory_options) -> ml_collections.ConfigDict:
  """``config.model_options`` of a generator made elastic by ``ofajax.elasticize``: one width
  (1.0) unless a stage asks for more; kernel sizes fixed (the 7x7 stem and head stay 7x7)."""
  return ml_collections.ConfigDict({
      "factory": f"ofajax.models.generators:{factory}",
      "factory_options": {"ngf": 16, "n_blocks": 6, "weights": "", **factory_options},
      "widths": (1.0,), "kernels": False})


def get_config():
  c = default.get_config()
  c.task = "gan"
  c.model = "elasticize"
  c.model_options = generator_options("resnet_generator")
  c.augment = "none"
  c.batch_size = 32
  c.learning_rate = 2e-4
  c.lr_schedule = "linear"
  c.distill = "none"           # stage 2 and 3: "teacher" (features of config.teacher_workdir)
  c.gan = ml_collections.ConfigDict({
      "loss": "lsgan",         # or "hinge"
      "gan_weight": 1.0,
      "l1_weight": 100.0,      # pix2pix's lambda_L1
      "feature_weight": 1.0,   # the feature-distillation MSE's weight (with a teacher)
      "distill_layers": (),    # generator module paths whose outputs are distilled
      "beta1": 0.5,
      "discriminator": {"ndf": 16, "n_layers": 2},
      # The digit classifier that judges generated digits (ofajax.gan.judge): overrides of its
      # training settings; every stage and the search must share one judge to be comparable.
      "judge": {}})
  c.num_epochs = 8.0
  c.phases = [ml_collections.ConfigDict({
      "name": "generator", "epochs": c.get_ref("num_epochs"),
      "learning_rate": c.get_ref("learning_rate"), "warmup_epochs": 0.0, "num_subnets": 1,
      "sampling": "random", "restrict": {}})]
  c.eval = ml_collections.ConfigDict({
      "num_random_subnets": 0, "calib_batches": 4, "calib_batch_size": 128, "batch_size": 250})
  c.checkpoint_every_steps = 250
  return c
