"""OFA MobileNetV3 on ImageNet: progressive shrinking as OFA's reference training script does it.

``--config configs/ofa_mbv3_imagenet.py:teacher`` trains the full network first (the teacher);
the default then shrinks it in five phases, distilling from that teacher:
  kernel K357 (D4 E6)  -> depth D34 -> D234 (K357 E6) -> expand E46 -> E346 (K357 D234).

Follows mit-han-lab/once-for-all (commit f03b267), ``train_ofa_net.py``:
- phases, epochs, learning rates, warmup and subnets per step (``dynamic_batch_size``): lines
  43-89. Its learning rates are per 64-image GPU batch times 32 GPUs (line 164: ``init_lr =
  base_lr * num_gpus``), i.e. for a global batch of 2048; scale them linearly with batch_size;
- cosine schedule, 10,000 training images held out for validation (``valid_size``), weight decay
  3e-5 not on BN nor biases, label smoothing 0.1: lines 94-104; distillation weight 1.0: line 127;
- starting weights: the kernel phase loads the trained full network (lines 256-265), every later
  phase the previous phase's (lines 285-310). Here every phase continues in one workdir, and the
  first starts from ``init_workdir`` = the teacher's workdir;
- channel sorting: ``progressive_shrinking.py`` lines 339-354 re-sort each block's expanded
  channels (``re_organize_middle_weights``) when an expand phase starts;
- a new optimizer per phase (each phase is a separate run there): ``config.fresh_optimizer``.

Deviations: resolutions 128..224 step 4 sampled per step like OFA's, but per batch rather than
per GPU worker; OFA validates on a random 10k subset of its train split (``valid_size``), ofajax
on the last 10k (``holdout``), which ``train_split`` leaves out. The second expand phase sorts
only inside the expand-4 prefix and its remainder (OFA's ``expand_ratio_stage=1``).
"""

import ml_collections

from configs import default


def _phase(name, epochs, lr, warmup, subnets, sampling="random", sort_channels=False,
           expand_stage=0, **restrict):
  return ml_collections.ConfigDict({"name": name, "epochs": epochs, "learning_rate": lr,
                                    "warmup_epochs": warmup, "num_subnets": subnets,
                                    "sampling": sampling, "sort_channels": sort_channels,
                                    "expand_stage": expand_stage, "restrict": restrict})


def get_config(arg: str = ""):
  c = default.get_config()
  c.model = "ofa_mbv3"
  c.model_options = ml_collections.ConfigDict({"num_classes": 1000, "width_mult": 1.0,
                                                "dropout_rate": 0.1})
  c.dataset = "imagenet2012"
  c.train_split, c.holdout = "train[:-10000]", 10000   # OFA: valid_size = 10,000
  c.test_split = "validation"
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
    c.init_workdir = c.get_ref("teacher_workdir")    # the kernel phase starts from the full net
    c.phases = [
        _phase("kernel", 120, 0.96, 5, 1, depth=[4], expand=[6]),
        _phase("depth1", 25, 0.08, 0, 2, depth=[3, 4], expand=[6]),
        _phase("depth2", 120, 0.24, 5, 2, expand=[6]),
        _phase("expand1", 25, 0.08, 0, 4, sort_channels=True, expand=[4, 6]),
        _phase("expand2", 120, 0.24, 5, 4, sort_channels=True, expand_stage=1),
    ]
  return c
