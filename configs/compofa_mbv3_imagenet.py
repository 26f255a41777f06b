"""CompOFA on ImageNet (Sahni et al., ICLR 2021): the compound space (expand coupled to depth:
3 / 4 / 6 for depth 2 / 3 / 4; kernels elastic 3 / 5 / 7), trained from the full OFA network in
two phases with channel sorting, distilled from it. Train the teacher with
``ofa_mbv3_imagenet.py:teacher``: its workdir fits both as teacher and as starting weights,
since CompOFA and OFA-MobileNetV3 share every layer.

Follows gatech-sysml/CompOFA, ``ofa/train_ofa_net.py`` (its copy of OFA's script):
- two phases from the teacher: 25 epochs at 2.5e-3 per GPU, then 120 epochs at 7.5e-3 with 5
  warmup epochs, 4 subnets per step; times 32 GPUs as OFA's learning rates are (0.08, 0.24);
- channel sorting at the start of each phase (``re_organize_middle_weights``);
- no kernel transform matrices: a smaller kernel is the plain centre crop of the 7x7
  (``dy_conv_scaling_mode = -1``), the model option ``kernel_transform=False``.

Deviations: as ``ofa_mbv3_imagenet.py`` (resolution per batch; one workdir for both phases).
"""

from configs import ofa_mbv3_imagenet


def get_config():
  c = ofa_mbv3_imagenet.get_config()
  c.model = "compofa_mbv3"
  c.model_options.kernel_transform = False
  phase = ofa_mbv3_imagenet._phase  # pylint: disable=protected-access
  c.phases = [phase("compound1", 25, 0.08, 0, 4, sort_channels=True),
              phase("compound2", 120, 0.24, 5, 4, sort_channels=True)]
  return c
