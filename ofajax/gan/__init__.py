"""GAN compression (GAN Compression, Li et al. 2020; PaddleSlim's OFA article) on a paired task.

Three stages, each a ``python train.py`` run with a ``configs/gan_*.py`` config
(``config.task = "gan"``), plus ``prune.py`` between the second and the third:

1. a generator trained directly: the ResNet generator of pix2pix / CycleGAN (the *original*),
   or its MobileNet-style variant (depthwise-separable residual blocks);
2. the MobileResNet generator pruned by filter L1 norm (``ofajax.prune``), then fine-tuned with
   feature distillation from the unpruned one plus the GAN objective;
3. an elastic supernet over the pruned generator's channels (``ofajax.elasticize``), trained
   with the same distillation from the stage-2 generator, then searched under MACs budgets.

Modules: ``data`` (the paired edges -> digit task), ``judge`` (the Fréchet distance and the
accuracy of a digit classifier, offline stand-ins for FID and the segmentation score),
``step`` (the jitted generator + discriminator step), ``train`` (the job ``train.py`` runs for
``task="gan"``). Feature distillation through 1x1 adapters is ``ofajax.feature_distill``,
shared with the classifier step.
"""
