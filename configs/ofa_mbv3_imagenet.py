"""OFA MobileNetV3 on ImageNet: progressive shrinking as OFA's reference training script does it.

``--config configs/ofa_mbv3_imagenet.py:teacher`` trains the full network first (the teacher);
the default then shrinks it in five phases, distilling from that teacher:
  kernel K357 (D4 E6)  -> depth D34 -> D234 (K357 E6) -> expand E46 -> E346 (K357 D234).
Epochs, learning rates and subnets per step per phase follow OFA's train_ofa_net.py (Cai et al.,
ICLR 2020): its learning rates are per 64-image GPU batch times 32 GPUs, i.e. for a global batch
of 2048 -- scale them linearly with config.batch_size. The supernet of every phase starts from
the previous phase's checkpoint because all phases run in one workdir.
"""

import ml_collections

from configs import default


def _phase(name, epochs, lr, warmup, subnets, sampling="random", **restrict):
  return ml_collections.ConfigDict({"name": name, "epochs": epochs, "learning_rate": lr,
                                    "warmup_epochs": warmup, "num_subnets": subnets,
                                    "sampling": sampling, "restrict": restrict})


def get_config(arg: str = ""):
  c = default.get_config()
  c.model = "ofa_mbv3"
  c.model_options = ml_collections.ConfigDict({"num_classes": 1000, "width_mult": 1.0,
                                                "dropout_rate": 0.1})
  c.dataset = "imagenet2012"
  c.train_split, c.test_split = "train", "validation"
  c.resolution = 224                              # evaluation size
  c.train_resolutions = tuple(range(128, 225, 4))  # one sampled per step (OFA: 128..224)
  c.augment = "imagenet"
  c.batch_size = 2048
  c.optimizer, c.momentum, c.nesterov = "sgd", 0.9, True
  c.weight_decay = 3e-5                           # not on BN nor biases
  c.label_smoothing = 0.1
  c.eval.num_random_subnets = 16
  c.eval.calib_batches = 20                       # OFA: 2,000 training images
  c.eval.calib_batch_size = 100
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  if arg == "teacher":
    c.distill = "none"
    c.phases = [_phase("teacher", 180, 2.6, 0, 1, kernel=[7], depth=[4], expand=[6])]
  else:
    c.distill, c.kd_weight = "teacher", 1.0
    c.teacher_workdir = "/path/to/teacher_workdir"  # set with --config.teacher_workdir=...
    c.phases = [
        _phase("kernel", 120, 0.96, 5, 1, depth=[4], expand=[6]),
        _phase("depth1", 25, 0.08, 0, 2, depth=[3, 4], expand=[6]),
        _phase("depth2", 120, 0.24, 5, 2, expand=[6]),
        _phase("expand1", 25, 0.08, 0, 4, expand=[4, 6]),
        _phase("expand2", 120, 0.24, 5, 4),
    ]
  return c
