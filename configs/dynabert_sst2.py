"""DynaBERT (Hou et al., NeurIPS 2020) on GLUE SST-2: an elastic BERT-base, width then depth.

Needs the data set prepared once (TensorFlow on the preparing machine only):

  tfds build glue/sst2 --file_format array_record

DynaBERT starts from a BERT fine-tuned on the task. Import one (no torch needed; see
docs/import.md), then run DynaBERT's two stages in one run from it, distilled from it:

  python convert_hf_bert.py --checkpoint path/to/bert-base-uncased-sst2 --workdir /tmp/bert_sst2
  python train.py --config configs/dynabert_sst2.py --workdir /tmp/dynabert \
      --config.init_workdir=/tmp/bert_sst2 --config.teacher_workdir=/tmp/bert_sst2 \
      --config.model_options.vocab_size=30522 --config.model_options.max_length=512 \
      --config.tokenizer=/tmp/bert_sst2/tokenizer/tokenizer.json

Without a checkpoint, ``configs/dynabert_sst2.py:full`` trains the full network on SST-2 alone
(word-level vocabulary) to start from instead.

Follows huawei-noah/Pretrained-Language-Model, ``DynaBERT/run_glue.py`` (``train``):
- heads and FFN neurons re-ordered by importance first (``compute_neuron_head_importance``,
  ``reorder_neuron_head``): ``config.reorder``;
- stage 1 (width-adaptive): every width multiplier 1.0 / 0.75 / 0.5 / 0.25, the same in every
  layer, on every batch (``for width_mult in sorted(width_mult_list, reverse=True)``), loss =
  soft cross-entropy to the teacher's logits + 0.1 x hidden-state MSE (``width_lambda1 = 1``,
  ``width_lambda2 = 0.1``), no hard-label loss;
- stage 2 (width- and depth-adaptive): every depth 1.0 / 0.75 / 0.5 x every width per batch,
  depth outer; hidden states of the k-th kept layer matched with the teacher's layer
  floor(k / d) (``kept_layers_index``); loss weights 1.0 and 1.0 (``depth_lambda1/2``);
- AdamW at 2e-5, gradient clipping at 1.0, 3 epochs per stage.

Deviations: the stage-2 teacher is the fine-tuned BERT, not the stage-1 width-adaptive network
at the student's width (one teacher serves both stages); ofajax standardises each token's
hidden vector before the MSE and averages over layers (DynaBERT sums raw MSE over layers); a
warmup of 10% of each stage (ofajax's choice). SST-2's test labels are hidden, so the
validation split is the test split here, and search validates on the last 1,000 training
sentences, which training never sees (``holdout``).
"""

import ml_collections

from configs import default

STAGES = ("elastic", "full")


def get_config(stage: str = "elastic"):
  if stage not in STAGES:
    raise ValueError(f"configs/dynabert_sst2.py:<stage>: stage must be one of {STAGES}, "
                     f"got {stage!r}")
  c = default.get_config()
  c.model = "elastic_bert"      # BERT-base: 12 layers, 768 wide, 12 heads, FFN 3072
  c.model_options = ml_collections.ConfigDict({
      "num_classes": 2, "vocab_size": 16384, "max_length": 128, "depth_rule": "spread",
      "depth_choices": (6, 9, 12), "min_heads": 3, "ffn_step": 768, "min_ffn_dim": 768,
      "resolutions": (64,)})
  c.dataset = "glue/sst2"
  c.train_split, c.holdout, c.test_split = "train[:-1000]", 1000, "validation"
  c.resolution = 64             # tokens per sentence ([CLS] ... [SEP], padded)
  c.augment = "none"
  c.batch_size = 32

  c.optimizer = "adamw"
  c.weight_decay = 0.01
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0

  c.eval.calib_batches = 1      # no BatchNorm: calibration has nothing to do
  c.eval.calib_batch_size = 32
  c.eval.batch_size = 128
  c.checkpoint_every_steps = 1000

  widths = {"heads": [3, 6, 9, 12], "ffn": [768, 1536, 2304, 3072]}  # width 0.25 .. 1.0
  if stage == "full":
    c.learning_rate = 1e-4
    c.distill = "none"
    c.num_epochs = 3.0
    c.phases = [ml_collections.ConfigDict({
        "name": "full", "epochs": c.get_ref("num_epochs"),
        "learning_rate": c.get_ref("learning_rate"), "warmup_epochs": 0.3, "num_subnets": 1,
        "sampling": "random", "restrict": {"depth": [12], "heads": [12], "ffn": [3072]}})]
    return c

  c.learning_rate = 2e-5        # DynaBERT fine-tunes at BERT's learning rate
  c.distill = "teacher"
  c.kd_loss = "soft_ce"         # DynaBERT's logit loss: soft cross-entropy
  c.kd_temperature = 1.0
  c.teacher_ce_weight = 0.0     # no hard-label loss beside the teacher (lambda1 * logits only)
  c.hidden_mse_weight = 1.0     # hidden states and the embedding output, equally weighted,
  c.embedding_mse_weight = 1.0  # scaled per stage by the phase's hidden_scale (lambda2)
  c.reorder.enabled = True
  c.reorder.batches = 32
  widths = [1.0, 0.75, 0.5, 0.25]  # of heads and FFN neurons, the same in every layer
  c.phases = [
      ml_collections.ConfigDict({
          "name": "width", "epochs": 3.0, "learning_rate": c.get_ref("learning_rate"),
          "warmup_epochs": 0.3, "sampling": "all", "uniform": ["heads", "ffn"],
          "multipliers": widths, "hidden_scale": 0.1, "restrict": {"depth": [12]}}),
      ml_collections.ConfigDict({
          "name": "width_depth", "epochs": 3.0, "learning_rate": c.get_ref("learning_rate"),
          "warmup_epochs": 0.3, "sampling": "all", "uniform": ["heads", "ffn"],
          "multipliers": widths, "hidden_scale": 1.0, "restrict": {}}),
  ]
  return c
