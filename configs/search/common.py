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

  # Scoring data, carved from the *training* split (slices as tfds reads them, e.g.
  # "train[-10000:]" for ImageNet as OFA holds out 10k images). The test split is used only to
  # report the chosen archs' top-1.
  c.resolution = 0              # 0: the training resolution
  c.calib_split = "train[:-1000]"
  c.calib_batches = 2
  c.calib_batch_size = 128
  c.valid_split = "train[-1000:]"
  c.valid_batch_size = 250
  c.test_split = ""             # "": the training config's test split
  c.report_test = True

  c.engine = ml_collections.ConfigDict({
      "chunk_size": 8,          # archs per compiled call; rounds are padded to whole chunks
      "archs_per_call": 1,      # of which this many run side by side (vmap): >1 pays on GPUs
      # "masked" | "active" | "auto" (see README, Execution modes). Masked: on the default
      # workdir, active scoring compiled 3x longer and the search took 159 s against 128 s.
      "execution": "masked"})

  c.latency = ml_collections.ConfigDict({
      "enabled": False,         # time segments of the dense subnets on this device
      "table": "",              # path of a saved latency_table.json to reuse
      "batch_size": 1, "num_table_archs": 100, "num_check_archs": 20, "warmup": 3,
      "repeats": 20})
  c.export = True               # dense subnet per target: orbax variables + StableHLO + arch
  return c
