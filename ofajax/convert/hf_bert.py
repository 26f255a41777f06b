"""Hugging Face ``BertForSequenceClassification`` checkpoints -> ofajax ``elastic_bert``.

DynaBERT (Hou et al., 2020) starts elastic training from a fine-tuned BERT. :func:`load` reads
a checkpoint directory as ``save_pretrained`` writes it (``config.json`` and
``model.safetensors``, its sharded form, or ``pytorch_model.bin``, read without torch by
:mod:`ofajax.convert.torch_zip`) into the options and variables of an ``elastic_bert`` that
computes the same logits; :func:`write_workdir` saves them as a finished training run that
``train.py --config.init_workdir=`` / ``--config.teacher_workdir=`` and ``search.py`` read.

What maps to what (HF names without the ``bert.`` prefix; ``LayerNorm.gamma`` / ``.beta`` of
older files are read as ``.weight`` / ``.bias``). torch's ``Linear.weight`` is [out, in], a
flax kernel [in, out]; ofajax splits the attention's hidden axis into [heads, head_dim], and HF
splits it the same way (head h is features h * head_dim ... (h + 1) * head_dim - 1):

  embeddings.word_embeddings / position_embeddings / token_type_embeddings
      -> word_embedding.embedding / pos_embedding / segment_embedding      (as stored)
  embeddings.LayerNorm                    -> ln_embedding                   (weight -> scale)
  encoder.layer.i.attention.self.{query,key,value}
      -> layer{i}.attention.{query,key,value}: kernel W.T as [D, H, D/H], bias as [H, D/H]
  encoder.layer.i.attention.output.dense  -> layer{i}.attention.out: kernel W.T as [H, D/H, D]
  encoder.layer.i.attention.output.LayerNorm -> layer{i}.ln_attention
  encoder.layer.i.intermediate.dense / output.dense -> layer{i}.ffn.fc1 / fc2 (kernel W.T)
  encoder.layer.i.output.LayerNorm        -> layer{i}.ln_ffn
  pooler.dense, classifier                -> pooler, classifier              (kernel W.T)

The config must describe what ``elastic_bert`` computes: post-LayerNorm layers, exact (erf)
GELU, absolute learned positions, two token types (ofajax adds type 0's embedding to every
token: single sentences), single-label classification; anything else is refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from typing import Callable, NamedTuple

import jax.numpy as jnp
import ml_collections
import numpy as np

from ofajax.convert import torch_zip
from ofajax.data import registry, wordpiece
from ofajax.models.elastic_bert import ElasticBERT

MODEL = "elastic_bert"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# Buffers some versions of transformers save next to the parameters: not weights.
IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")
# DynaBERT's elastic space: width multipliers 0.25 .. 1 of heads and FFN, depth 0.5, 0.75, 1.
WIDTH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
DEPTH_FRACTIONS = (0.5, 0.75, 1.0)


class CheckpointError(ValueError):
  """A checkpoint that is not a BERT classifier elastic_bert can hold, or is incomplete."""


class Imported(NamedTuple):
  """A checkpoint read into ofajax: ``models.get(MODEL, **options)`` runs ``variables``."""
  options: dict           # elastic_bert model options
  variables: dict         # {"params", "batch_stats": {}}
  hf_config: dict         # the checkpoint's config.json
  directory: str
  weights_file: str       # the file the weights came from
  tokenizer: str | None   # the directory's tokenizer.json or vocab.txt, if any


# --------------------------------------------------------------------------- config


def read_config(directory: str) -> dict:
  """The checkpoint's ``config.json``, checked to be a BERT that elastic_bert reproduces."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Hugging Face checkpoint directory {directory!r} does not exist "
                            "(pass the directory save_pretrained wrote)")
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {directory!r} is not a Hugging Face checkpoint "
                            "directory (save_pretrained writes config.json)")
  with open(path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from None
  _check_config(config, path)
  return config


def num_labels(config: dict) -> int:
  """Classes of the checkpoint's classifier: HF saves ``id2label``, not ``num_labels``."""
  return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def _check_config(config: dict, path: str) -> None:
  """Refuses, by name, what elastic_bert does not compute as the checkpoint's model does."""
  wants = [("model_type", config.get("model_type"), "bert"),
           ("hidden_act", config.get("hidden_act", "gelu"), "gelu"),   # HF's "gelu" is erf GELU
           ("position_embedding_type", config.get("position_embedding_type", "absolute"),
            "absolute"),
           ("type_vocab_size", config.get("type_vocab_size", 2), 2),
           ("is_decoder", config.get("is_decoder", False), False),
           ("add_cross_attention", config.get("add_cross_attention", False), False)]
  for key, got, want in wants:
    if got != want:
      what = "not a BERT checkpoint" if key == "model_type" else "elastic_bert cannot reproduce it"
      raise CheckpointError(f"{path}: {key} is {got!r}, not {want!r}: {what}")
  if config.get("problem_type") not in (None, "single_label_classification"):
    raise CheckpointError(f"{path}: problem_type {config['problem_type']!r}; elastic_bert "
                          "trains single-label classifiers only")
  if num_labels(config) < 2:
    raise CheckpointError(f"{path}: {num_labels(config)} label(s); a classifier needs at least "
                          "2 (regression heads are not supported)")
  if config.get("hidden_size", 768) % config.get("num_attention_heads", 12):
    raise CheckpointError(f"{path}: hidden_size is not a multiple of num_attention_heads")


def elastic_options(num_layers: int, num_heads: int, ffn_dim: int) -> dict:
  """DynaBERT's space for these sizes: heads and FFN width from a quarter of the full size,
  in quarters (the full width where it is not divisible by 4), depth 1/2, 3/4 and all."""
  ffn_step = ffn_dim // 4 if ffn_dim % 4 == 0 else ffn_dim
  depths = sorted({max(1, round(f * num_layers)) for f in DEPTH_FRACTIONS})
  return {"min_heads": max(1, round(min(WIDTH_FRACTIONS) * num_heads)), "ffn_step": ffn_step,
          "min_ffn_dim": ffn_step, "depth_choices": tuple(depths), "depth_rule": "spread"}


def model_options(config: dict, resolution: int | None = None) -> dict:
  """elastic_bert options equal to the checkpoint's model; ``resolution``: the sequence length
  the search space counts MACs at (default 128, or fewer if the model's positions end before)."""
  layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
  ffn = int(config["intermediate_size"])
  max_length = int(config.get("max_position_embeddings", 512))
  resolution = min(128, max_length) if resolution is None else int(resolution)
  if not 1 <= resolution <= max_length:
    raise ValueError(f"sequence length {resolution} must be in [1, max_position_embeddings="
                     f"{max_length}]")
  return {"num_classes": num_labels(config), "vocab_size": int(config["vocab_size"]),
          "max_length": max_length, "pad_id": int(config.get("pad_token_id") or 0),
          "hidden_dim": int(config["hidden_size"]), "num_layers": layers, "num_heads": heads,
          "ffn_dim": ffn, "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
          "dropout_rate": float(config.get("hidden_dropout_prob", 0.1)),
          "attention_dropout_rate": float(config.get("attention_probs_dropout_prob", 0.1)),
          **elastic_options(layers, heads, ffn), "resolutions": (int(resolution),)}


# --------------------------------------------------------------------------- weights


def weights_file(directory: str) -> str:
  """The checkpoint's weights: model.safetensors (or its shard index), else pytorch_model.bin."""
  for name in WEIGHT_FILES:
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise FileNotFoundError(f"{directory!r} has no weights: expected one of {list(WEIGHT_FILES)}")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  # bfloat16 files read too: ml_dtypes (imported by torch_zip and jax) registers the dtype name
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # noqa: BLE001 -- safetensors raises its own kinds; name the file
    raise ValueError(f"{path} could not be read as safetensors ({type(e).__name__}: {e})") from e


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a weights file (:func:`weights_file`), shards merged."""
  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    merged = {}
    for shard in shards:
      merged.update(_read_safetensors(os.path.join(os.path.dirname(path), shard)))
    return merged
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  return torch_zip.load(path)


class Entry(NamedTuple):
  """One HF tensor: its name (no ``bert.`` prefix), HF shape, ofajax path and re-layout."""
  name: str
  shape: tuple[int, ...]
  path: tuple[str, ...]
  layout: Callable[[np.ndarray], np.ndarray]


def _same(w):
  return w


def _transpose(w):
  return w.T


def _norm(name: str, path: tuple[str, ...], d: int) -> list[Entry]:
  return [Entry(f"{name}.weight", (d,), path + ("scale",), _same),
          Entry(f"{name}.bias", (d,), path + ("bias",), _same)]


def _dense(name: str, path: tuple[str, ...], d_in: int, d_out: int) -> list[Entry]:
  return [Entry(f"{name}.weight", (d_out, d_in), path + ("kernel",), _transpose),
          Entry(f"{name}.bias", (d_out,), path + ("bias",), _same)]


def _layer_entries(i: int, d: int, heads: int, ffn: int) -> list[Entry]:
  hf, ox, hd = f"encoder.layer.{i}", (f"layer{i}",), d // heads
  entries = []
  for name in ("query", "key", "value"):
    entries += [Entry(f"{hf}.attention.self.{name}.weight", (d, d), ox + ("attention", name,
                      "kernel"), lambda w: w.T.reshape(d, heads, hd)),
                Entry(f"{hf}.attention.self.{name}.bias", (d,), ox + ("attention", name, "bias"),
                      lambda b: b.reshape(heads, hd))]
  entries += [Entry(f"{hf}.attention.output.dense.weight", (d, d),
                    ox + ("attention", "out", "kernel"), lambda w: w.T.reshape(heads, hd, d)),
              Entry(f"{hf}.attention.output.dense.bias", (d,), ox + ("attention", "out", "bias"),
                    _same)]
  return (entries + _norm(f"{hf}.attention.output.LayerNorm", ox + ("ln_attention",), d)
          + _dense(f"{hf}.intermediate.dense", ox + ("ffn", "fc1"), d, ffn)
          + _dense(f"{hf}.output.dense", ox + ("ffn", "fc2"), ffn, d)
          + _norm(f"{hf}.output.LayerNorm", ox + ("ln_ffn",), d))


def entries(options: dict) -> list[Entry]:
  """Every tensor of a BertForSequenceClassification with these elastic_bert options."""
  d, heads, ffn = options["hidden_dim"], options["num_heads"], options["ffn_dim"]
  out = [Entry("embeddings.word_embeddings.weight", (options["vocab_size"], d),
               ("word_embedding", "embedding"), _same),
         Entry("embeddings.position_embeddings.weight", (options["max_length"], d),
               ("pos_embedding",), _same),
         Entry("embeddings.token_type_embeddings.weight", (2, d), ("segment_embedding",), _same)]
  out += _norm("embeddings.LayerNorm", ("ln_embedding",), d)
  for i in range(options["num_layers"]):
    out += _layer_entries(i, d, heads, ffn)
  return (out + _dense("pooler.dense", ("pooler",), d, d)
          + _dense("classifier", ("classifier",), d, options["num_classes"]))


def _canonical(name: str) -> str:
  """A state-dict key without the ``bert.`` prefix, old LayerNorm spellings made new."""
  name = name[len("bert."):] if name.startswith("bert.") else name
  if ".LayerNorm." in name or name.startswith("LayerNorm."):
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
  return name


def from_state_dict(state_dict: dict, options: dict, source: str = "the checkpoint") -> dict:
  """elastic_bert ``{"params", "batch_stats"}`` from a HF BERT state dict; a missing tensor,
  an unexpected one and a wrong shape are named (as spelled in ``source``)."""
  spelled = {_canonical(k): k for k in state_dict}
  prefix = "bert." if any(k.startswith("bert.") for k in state_dict) else ""
  show = lambda name: name if name.startswith("classifier") else prefix + name  # file's spelling
  params: dict = {}
  for e in entries(options):
    if e.name not in spelled:
      raise CheckpointError(f"{source} has no tensor {show(e.name)!r} (a "
                            f"BertForSequenceClassification of {options['num_layers']} layers "
                            "has one)")
    w = np.asarray(state_dict[spelled.pop(e.name)])
    if tuple(w.shape) != e.shape:
      raise CheckpointError(f"{source}: {show(e.name)} has shape {list(w.shape)}; its "
                            f"config.json implies {list(e.shape)}")
    node = params
    for key in e.path[:-1]:
      node = node.setdefault(key, {})
    node[e.path[-1]] = jnp.asarray(e.layout(w.astype(np.float32)))
  extra = sorted(spelled[k] for k in spelled if k not in IGNORED)
  if extra:
    raise CheckpointError(f"{source} has {len(extra)} tensor(s) elastic_bert has no place for, "
                          f"e.g. {extra[:3]}: is it a BertForSequenceClassification?")
  return {"params": params, "batch_stats": {}}


# --------------------------------------------------------------------------- checkpoint


def tokenizer_file(directory: str) -> str | None:
  """The directory's tokenizer.json (HF's whole pipeline) or else vocab.txt, or None."""
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def check_tokenizer(path: str, options: dict) -> None:
  """Refuses a tokenizer whose ids the model cannot embed or whose [PAD] the model would
  attend to (elastic_bert masks the keys equal to ``pad_id``)."""
  vocab = wordpiece.load(path)
  if len(vocab) > options["vocab_size"]:
    raise CheckpointError(f"tokenizer {path} has {len(vocab)} ids; the model embeds "
                          f"{options['vocab_size']}")
  if vocab.pad_id != options["pad_id"]:
    raise CheckpointError(f"tokenizer {path} pads with id {vocab.pad_id}, but config.json's "
                          f"pad_token_id is {options['pad_id']}")


def load(directory: str, resolution: int | None = None) -> Imported:
  """Reads a HF BertForSequenceClassification checkpoint directory (see the module doc)."""
  config = read_config(directory)
  options = model_options(config, resolution)
  path = weights_file(directory)
  variables = from_state_dict(load_state_dict(path), options, path)
  tokenizer = tokenizer_file(directory)
  if tokenizer:
    check_tokenizer(tokenizer, options)
  return Imported(options, variables, config, directory, path, tokenizer)


# --------------------------------------------------------------------------- workdir


def written_options(base_options: dict, options: dict) -> dict:
  """The model options a workdir records: the checkpoint's where they differ from elastic_bert's
  defaults or ``base_options`` names them, plus ``base_options``' other elastic_bert ones.

  ``train.py --config.init_workdir`` needs the run's model options to *equal* the workdir's
  (as dicts), and ``--config.model_options.X`` can only set keys the config file has: writing
  no more keys than needed lets a config such as dynabert_sst2.py match with a few overrides."""
  fields = {f.name: f.default for f in dataclasses.fields(ElasticBERT)
            if f.default is not dataclasses.MISSING}
  kept = {k: v for k, v in base_options.items() if k in fields and k not in options}
  kept.update({k: v for k, v in options.items() if k in base_options or fields.get(k) != v})
  return kept


def _options_of(config) -> dict:
  from ofajax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top (orbax)
  return workdir_lib.model_options(config)


def imported_config(base: ml_collections.ConfigDict, imported: Imported,
                    tokenizer: str | None = None) -> ml_collections.ConfigDict:
  """``base`` (a text training config, e.g. configs/dynabert_sst2.py:full) made the config of
  the imported network as a *finished* run: one empty phase, nothing to distil from, and its
  search space counting MACs at ``base.resolution``. ``tokenizer``: the file the text pipeline
  must tokenize with (``config.tokenizer``)."""
  spec = registry.lookup_spec(base.dataset)
  if spec is not None and spec.num_classes != imported.options["num_classes"]:
    raise ValueError(f"the checkpoint classifies into {imported.options['num_classes']} labels, "
                     f"but {base.dataset} has {spec.num_classes} classes: pick the config of "
                     "the data set it was fine-tuned on (--config.dataset)")
  options = dict(imported.options, resolutions=(int(base.resolution),))
  if not 1 <= base.resolution <= options["max_length"]:
    raise ValueError(f"config.resolution {base.resolution} must be in [1, "
                     f"max_position_embeddings={options['max_length']}]")
  config = copy.deepcopy(base)
  with config.unlocked():
    config.model = MODEL
    config.model_options = ml_collections.ConfigDict(written_options(_options_of(base), options))
    config.tokenizer = tokenizer or ""
    config.imported_from = os.path.abspath(imported.directory)
    config.distill, config.teacher_workdir, config.init_workdir = "none", "", ""
    config.hidden_mse_weight = config.embedding_mse_weight = 0.0
    if "reorder" in config:   # re-ordering is for the elastic run that starts from this one
      config.reorder.enabled = False
    config.phases = [ml_collections.ConfigDict({
        "name": "imported", "epochs": 0.0, "learning_rate": 0.0, "warmup_epochs": 0.0,
        "num_subnets": 1, "sampling": "random", "restrict": {}})]
  return config


def _copy_tokenizer(directory: str, target: str) -> None:
  """The tokenizer files (and tokenizer_config.json: vocab.txt's lowercasing) into target."""
  os.makedirs(target, exist_ok=True)
  for name in TOKENIZER_FILES + ("tokenizer_config.json",):
    if os.path.exists(os.path.join(directory, name)):
      shutil.copy(os.path.join(directory, name), os.path.join(target, name))


def write_workdir(imported: Imported, workdir: str,
                  base: ml_collections.ConfigDict) -> tuple[int, ml_collections.ConfigDict]:
  """Saves ``imported`` as a new training workdir under :func:`imported_config` (the tokenizer
  copied to ``<workdir>/tokenizer/``); returns (the checkpoint's step, the config written)."""
  # orbax and the trainer are needed only here, not to read a checkpoint
  from ofajax.convert import workdir as convert_workdir  # pylint: disable=g-import-not-at-top
  tokenizer_dir = os.path.join(os.path.abspath(workdir), "tokenizer")
  tokenizer = (os.path.join(tokenizer_dir, os.path.basename(imported.tokenizer))
               if imported.tokenizer else None)
  config = imported_config(base, imported, tokenizer)
  step = convert_workdir.write_workdir(
      workdir, config, imported.variables,
      {"imported_from": os.path.abspath(imported.weights_file)})
  if imported.tokenizer:
    _copy_tokenizer(imported.directory, tokenizer_dir)
  return step, config
