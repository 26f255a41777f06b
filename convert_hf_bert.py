"""Import a fine-tuned Hugging Face BertForSequenceClassification into an ofajax workdir.

  python convert_hf_bert.py --checkpoint path/to/bert-base-uncased-sst2 \
      --workdir workdir/bert_sst2 [--config configs/dynabert_sst2.py:full] [--config.x=y]

Reads the checkpoint directory (``config.json`` and ``model.safetensors``, its shards, or
``pytorch_model.bin``, read without torch; ``tokenizer.json`` / ``vocab.txt`` if there), maps
every tensor onto an ``elastic_bert`` that computes the same logits (ofajax.convert.hf_bert) and
writes ``config.json`` + ``checkpoints/`` as a finished run of ``--config`` (its data set,
sequence length and optimizer; one empty phase), the tokenizer copied to
``<workdir>/tokenizer/``. It prints the flags that start DynaBERT from it:

  python train.py --config configs/dynabert_sst2.py --workdir workdir/dynabert \
      --config.init_workdir=workdir/bert_sst2 --config.teacher_workdir=workdir/bert_sst2 \
      <the printed --config.model_options.* and --config.tokenizer flags>
"""

import shlex

from absl import app, flags, logging

from ofajax import cost, errors, models
from ofajax import workdir as workdir_lib
from ofajax.convert import hf_bert

_CONFIG = errors.define_config_file(
    "config", "configs/dynabert_sst2.py:full", "the text training config the imported model is "
    "written under (data set, sequence length, optimizer); its model is replaced")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory: "
                                  "config.json + model.safetensors (or pytorch_model.bin)")
_WORKDIR = flags.DEFINE_string("workdir", None, "new directory for config.json and checkpoints")


def _flag(key: str, value) -> str:
  text = value if isinstance(value, str) else repr(value)
  return shlex.quote(f"--config.{key}={text}")


def train_flags(written, base) -> tuple[list[str], list[str]]:
  """(flags that make a run of ``base``'s model options use the written workdir as
  ``init_workdir``, option keys ``base`` lacks, which flags cannot add)."""
  ours, theirs = workdir_lib.model_options(written), workdir_lib.model_options(base)
  changed = [k for k in ours if k in theirs and ours[k] != theirs[k]]
  out = [_flag(f"model_options.{k}", ours[k]) for k in changed]
  if written.tokenizer:
    out.append(_flag("tokenizer", written.tokenizer))
  return out, sorted(set(ours) - set(theirs))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _CHECKPOINT.value or not _WORKDIR.value:
    raise app.UsageError("pass --checkpoint (a Hugging Face checkpoint directory) and --workdir")
  logging.set_verbosity(logging.WARNING)  # orbax logs every step of the save at INFO
  base = _CONFIG.value
  imported = hf_bert.load(_CHECKPOINT.value, int(base.resolution))
  step, written = hf_bert.write_workdir(imported, _WORKDIR.value, base)
  model, space = models.get(written.model, **workdir_lib.model_options(written))
  big = cost.count(model, space.largest(), int(base.resolution))
  print(f"imported {imported.weights_file} into {_WORKDIR.value} (step {step}): elastic_bert "
        f"{workdir_lib.model_options(written)}; largest subnet {big['macs'] / 1e6:.1f}M MACs at "
        f"{base.resolution} tokens, {big['params'] / 1e6:.2f}M params")
  if not imported.tokenizer:
    print("no tokenizer.json / vocab.txt in the checkpoint: set --config.tokenizer to the one "
          "it was fine-tuned with")
  extra_flags, missing = train_flags(written, base)
  print("to start elastic training from it, add to a train.py command line with these model "
        f"options:\n  --config.init_workdir={_WORKDIR.value} "
        f"--config.teacher_workdir={_WORKDIR.value} " + " ".join(extra_flags))
  if missing:
    print(f"and add {missing} to the training config's model_options (as in "
          f"{_WORKDIR.value}/config.json): command-line flags cannot add keys")


if __name__ == "__main__":
  errors.run(main)
