"""A published once-for-all supernet imported with convert_ofa.py (ImageNet, 1000 classes).

``--config configs/ofa_pretrained.py:<id>``, id one of ofa_mbv3_w1.0, ofa_mbv3_w1.2,
ofa_resnet50. convert_ofa.py writes this config into the workdir with the imported weights as a
*finished* run: its schedule is one empty phase, so ``python train.py`` on that workdir goes
straight to the final evaluation (per-subnet BN calibration on 2,000 training images, as OFA
does, then top-1 on the validation split) and ``python search.py`` reads the weights like any
trained supernet's. The weights come from OFA's progressive shrinking (Cai et al., ICLR 2020),
not from this schedule; to fine-tune them, start from ofa_mbv3_imagenet.py instead.
"""

import ml_collections

from configs import ofa_mbv3_imagenet

# model name + options, input resolutions OFA trained each supernet at (once-for-all README).
MODELS = {
    "ofa_mbv3_w1.0": ("ofa_mbv3", {"width_mult": 1.0, "dropout_rate": 0.1},
                      tuple(range(128, 225, 4))),
    "ofa_mbv3_w1.2": ("ofa_mbv3", {"width_mult": 1.2, "dropout_rate": 0.1},
                      tuple(range(160, 225, 4))),
    "ofa_resnet50": ("ofa_resnet50", {"dropout_rate": 0.0}, tuple(range(128, 225, 4))),
}


def get_config(arg: str = "ofa_mbv3_w1.0"):
  if arg not in MODELS:
    raise ValueError(f"configs/ofa_pretrained.py:<id> needs one of {sorted(MODELS)}, got {arg!r}")
  model, options, resolutions = MODELS[arg]
  c = ofa_mbv3_imagenet.get_config()
  c.model = model
  c.model_options = ml_collections.ConfigDict({"num_classes": 1000, **options})
  c.train_resolutions = resolutions
  c.imported_from = arg
  c.distill, c.teacher_workdir = "inplace", ""
  c.phases = [ml_collections.ConfigDict({
      "name": "imported", "epochs": 0.0, "learning_rate": 0.0, "warmup_epochs": 0.0,
      "num_subnets": 2, "sampling": "sandwich", "restrict": {}})]
  return c
