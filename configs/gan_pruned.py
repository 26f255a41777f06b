"""GAN compression, stage 2: the MobileResNet generator pruned by filter L1 norm, recovered
with feature distillation from the unpruned one plus the GAN objective (GAN Compression).

``prune.py`` keeps the half of every channel group's filters with the largest L1 norm and writes
the pruned weights; this run rebuilds the generator at those widths from them
(``factory_options.weights``) and fine-tunes it: pix2pix's LSGAN + L1 objective plus the MSE
between its block outputs, through learned 1x1 adapters, and the teacher's
(``config.teacher_workdir``: the stage-1b workdir).

  python prune.py --workdir /tmp/gan/mobile --out /tmp/gan/pruned_weights
  python train.py --config configs/gan_pruned.py --workdir /tmp/gan/pruned \\
      --config.teacher_workdir=/tmp/gan/mobile \\
      --config.model_options.factory_options.weights=/tmp/gan/pruned_weights/pruned.msgpack
"""

from configs import gan_resnet

# The trunk after each pair of the six residual blocks, and the first upsampling: GAN
# Compression distils a few intermediate activations of the generator's trunk.
DISTILL_LAYERS = ("block1", "block3", "block5", "up1")


def get_config():
  c = gan_resnet.get_config()
  c.model_options = gan_resnet.generator_options("mobile_resnet_generator")
  c.distill = "teacher"
  c.gan.distill_layers = DISTILL_LAYERS
  c.num_epochs = 8.0
  return c
