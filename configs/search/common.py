"""Settings every search shares: checkpoint, data for scoring, engine, latency, export."""

import ml_collections


def base_config(name: str, method: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name                 # results go to <workdir>/search/<name>/
  c.method = method             # "greedy" | "evolution"
  c.seed = 0
  c.checkpoint_step = -1        # -1: the latest checkpoint of the workdir

  # Budgets: absolute MACs, or fractions of the largest subnet's MACs (used when target_macs
  # is empty). A target below the smallest subnet is an error that names the smallest.
  c.target_macs = ()
  c.target_fractions = (0.75, 0.5, 0.35)
  c.max_params = 0              # 0: no bound (evolution; greedy slims until within it)
  c.max_latency_ms = 0.0        # 0: no bound; predicted at latency.batch_size (needs
                                # latency.enabled)

  # Scoring data, carved from the *training* data set (slices as tfds reads them, e.g.
  # "train[-10000:]" for ImageNet as OFA holds out 10k images). The validation split must not
  # overlap the training run's train_split (read from <workdir>/config.json): scores on images
  # the supernet trained on overstate accuracy, so search.py refuses that, naming both splits.
  # The test split is used only to report the chosen archs' top-1.
  c.resolution = 0              # 0: the training resolution (greedy; evolution: see resolutions)
  # Evolution's resolution gene (OFA searches the image size, "image_size" in its arch
  # encoder): the resolutions a candidate may take. (): the training run's train_resolutions,
  # or its one resolution (no gene); config.resolution > 0 pins one.
  c.resolutions = ()
  c.calib_split = ""            # "": the training run's train_split (as training's own eval)
  c.calib_batches = 2
  c.calib_batch_size = 128
  # "": the slice training held out: <base>[-holdout:] when the training config has
  # holdout > 0 (the default trains on train[:-500], holdout 500), else the tail of the base
  # split after the training split's last example; an error if training read all of it.
  c.valid_split = ""
  c.valid_batch_size = 250
  c.test_split = ""             # "": the training config's test split
  c.report_test = True

  c.engine = ml_collections.ConfigDict({
      "chunk_size": 8,          # archs per compiled call; rounds are padded to whole chunks
      "archs_per_call": 1,      # of which this many run side by side (vmap): >1 pays on GPUs
      # "masked" | "active" | "auto" (see README, Execution modes). Masked: on the default
      # workdir, active scoring compiled 3x longer and the search took 159 s against 128 s.
      "execution": "masked",
      # engines (one per resolution, each with the validation split on the device) kept at
      # once when evolution searches several resolutions; others are rebuilt when needed
      "resident_resolutions": 2})

  # Latency on this device (docs/search.md, Latency). "model": whole dense subnets timed at
  # batch_size and serving_batch_size, a linear model fitted on arch features
  # (latency_model.json); "segments": OFA's per-segment table (latency_table.json; far off on
  # small networks). The chosen subnets are re-timed whole into result.json.
  c.latency = ml_collections.ConfigDict({
      "enabled": False,
      "method": "model",        # "model" | "segments"
      "table": "",              # path of a saved latency_model.json / latency_table.json
      "batch_size": 1,          # the batch latency_ms and max_latency_ms refer to
      "serving_batch_size": 32,  # model: also fitted and reported at this batch (0: none)
      "num_fit_archs": 32,      # model: archs timed whole to fit it, spread over MACs
      "num_table_archs": 100,   # segments: random archs whose segments are timed
      "num_check_archs": 20,    # unseen archs timed whole to report the prediction error
      "warmup": 3,
      "repeats": 20,            # segments: timed calls per segment (median)
      "seconds": 0.3, "rounds": 10,  # model: timing per arch, spread over rounds (10th pct.)
      "retime_chosen": True})
  c.export = True               # dense subnet per target: orbax variables + StableHLO + arch
  # "int8": after the float search, re-choose each target's subnet by int8 validation top-1
  # among its quantize_candidates best measured archs (plus the float choice and smaller
  # targets' candidates that fit); report int8 val / test top-1 and export
  # model_int8.stablehlo next to model.stablehlo (docs/deployment.md). "": float only.
  c.quantize = ""
  c.quantize_candidates = 4
  # With quantize=int8: quantization-aware fine-tune of each chosen int8 subnet (ofajax/qat.py)
  # before it is tested and exported; 0: post-training quantization only. qat_loss: "labels"
  # (cross-entropy) or "float_teacher" (the float subnet's outputs as soft targets).
  c.qat_steps = 0
  c.qat_learning_rate = 1e-4
  c.qat_batch_size = 64
  c.qat_loss = "labels"
  return c
