"""CompOFA on ImageNet: the compound space (fixed kernels, expand coupled to depth), one phase,
4 subnets per step, distilled from the full network (Sahni et al., ICLR 2021: half of OFA's
training time with equal accuracy). Train the teacher with ofa_mbv3_imagenet.py:teacher."""

from configs import ofa_mbv3_imagenet


def get_config():
  c = ofa_mbv3_imagenet.get_config()
  c.model = "compofa_mbv3"
  c.phases = [ofa_mbv3_imagenet._phase("compound", 120, 0.24, 5, 4)]  # CompOFA's phase 2 recipe
  return c
