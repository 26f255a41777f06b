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
  c.max_params = 0              # 0: no bound (evolution)
  c.max_latency_ms = 0.0        # 0: no bound (evolution; needs latency.enabled)

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

  c.latency = ml_collections.ConfigDict({
      "enabled": False,         # time segments of the dense subnets on this device
      "table": "",              # path of a saved latency_table.json to reuse
      "batch_size": 1, "num_table_archs": 100, "num_check_archs": 20, "warmup": 3,
      "repeats": 20})
  c.export = True               # dense subnet per target: orbax variables + StableHLO + arch
  return c
