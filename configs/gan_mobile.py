"""GAN compression, stage 1b: the MobileResNet generator trained directly (see gan_resnet.py).

GAN Compression's lighter generator: each residual block's two 3x3 convs become depthwise-
separable convs (``ofajax.models.generators.MobileResnetGenerator``); everything else, the
discriminator and the objective are stage 1's.

  python train.py --config configs/gan_mobile.py --workdir /tmp/gan/mobile
"""

from configs import gan_resnet


def get_config():
  c = gan_resnet.get_config()
  c.model_options = gan_resnet.generator_options("mobile_resnet_generator")
  return c
