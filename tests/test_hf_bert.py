"""Importing a Hugging Face BertForSequenceClassification (ofajax.convert.hf_bert) and tokenizing
with its WordPiece vocabulary (ofajax.data.wordpiece), against tests/fixtures/hf_bert_tiny/:
a tiny random model whose token ids and logits (and two subnets' logits, computed in torch by
editing the weights) transformers itself produced (tests/fixtures/make_hf_bert_fixture.py).
Neither torch nor transformers is needed here.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import dynabert_sst2
from ofajax import data, evaluation, models
from ofajax.convert import hf_bert, torch_zip
from ofajax.data import wordpiece
from ofajax.workdir import load_supernet

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf_bert_tiny")
LENGTH = 16  # the fixture's sequence length
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference():
  with np.load(os.path.join(FIXTURE, "reference.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def imported():
  return hf_bert.load(FIXTURE, resolution=LENGTH)


def _forward(model):
  return jax.jit(lambda v, x, a: model.apply(v, x, a, train=False),
                 compiler_options=models.FAST_COMPILE)


def _subnet_arch(reference, i):
  return {"depth": np.int32(reference["subnet_layers"][i].sum()),
          "heads": reference["subnet_heads"][i], "ffn": reference["subnet_ffn"][i]}


def _copy_fixture(tmp_path, drop=()):
  target = str(tmp_path / "bert")
  shutil.copytree(FIXTURE, target, ignore=shutil.ignore_patterns(*drop))
  return target


# --------------------------------------------------------------------------- weights


def test_options_follow_the_checkpoint_config(imported):
  o = imported.options
  assert (o["vocab_size"], o["max_length"], o["hidden_dim"], o["num_layers"], o["num_heads"],
          o["ffn_dim"], o["num_classes"], o["pad_id"]) == (107, 64, 32, 2, 4, 64, 2, 0)
  assert o["layer_norm_eps"] == 1e-12 and o["resolutions"] == (LENGTH,)
  # DynaBERT's space: widths in quarters, depth 1/2, 3/4, all (layers dropped evenly)
  assert (o["min_heads"], o["ffn_step"], o["min_ffn_dim"], o["depth_choices"],
          o["depth_rule"]) == (1, 16, 16, (1, 2), "spread")
  assert imported.tokenizer == os.path.join(FIXTURE, "tokenizer.json")


def test_imported_logits_equal_transformers(imported, reference):
  model, space = models.get("elastic_bert", **imported.options)
  logits = _forward(model)(imported.variables, reference["ids"], space.largest())
  np.testing.assert_allclose(logits, reference["logits"], atol=1e-4, rtol=0)


def test_subnets_equal_transformers_with_heads_and_neurons_removed(imported, reference):
  """Fewer heads / FFN neurons / layers on the imported weights, as the supernet and as the
  sliced dense subnet (active-size execution equals masked: test_active_transformers.py)."""
  model, _ = models.get("elastic_bert", **imported.options)
  forward = _forward(model)
  for i in range(len(reference["subnet_logits"])):
    arch = _subnet_arch(reference, i)
    np.testing.assert_array_equal(model.keep(arch), reference["subnet_layers"][i])
    np.testing.assert_allclose(forward(imported.variables, reference["ids"], arch),
                               reference["subnet_logits"][i], atol=1e-4, rtol=0)
  arch = _subnet_arch(reference, 1)
  dense = model.dense_model(arch)
  logits = jax.jit(lambda v, x: dense.apply(v, x, train=False),
                   compiler_options=models.FAST_COMPILE)(
      model.slice_variables(imported.variables, arch), reference["ids"])
  np.testing.assert_allclose(logits, reference["subnet_logits"][1], atol=1e-4, rtol=0)


def test_pytorch_bin_reads_without_torch_as_safetensors_does():
  from_bin = torch_zip.load(os.path.join(FIXTURE, "pytorch_model.bin"))
  from_st = hf_bert.load_state_dict(os.path.join(FIXTURE, "model.safetensors"))
  assert sorted(from_bin) == sorted(from_st)
  for k, v in from_st.items():
    assert from_bin[k].dtype == v.dtype
    np.testing.assert_array_equal(from_bin[k], v, err_msg=k)


def test_bin_only_checkpoint_and_old_layer_norm_names(tmp_path, imported):
  """A directory with pytorch_model.bin only; LayerNorm.gamma / beta (older files) and no
  ``bert.`` prefix (a BertModel-style key set plus the classifier) read the same."""
  directory = _copy_fixture(tmp_path, drop=("model.safetensors",))
  got = hf_bert.load(directory, resolution=LENGTH)
  assert got.weights_file.endswith("pytorch_model.bin")
  jax.tree.map(np.testing.assert_array_equal, got.variables, imported.variables)
  sd = hf_bert.load_state_dict(os.path.join(FIXTURE, "model.safetensors"))
  renamed = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in sd.items()}
  variables = hf_bert.from_state_dict(renamed, imported.options)
  jax.tree.map(np.testing.assert_array_equal, variables, imported.variables)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.txt", "."])
def test_tokenizer_gives_the_fixture_ids(reference, name):
  vocab = wordpiece.load(os.path.join(FIXTURE, name))
  ids = np.stack([vocab.encode(s, LENGTH) for s in reference["sentences"]])
  np.testing.assert_array_equal(ids, reference["ids"])
  assert (vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.unk_id, len(vocab)) == (0, 6, 7, 5, 107)
  assert vocab.decode(vocab.encode("Films!", 6)) == "[CLS] film ##s ! [SEP]"
  np.testing.assert_array_equal(vocab.encode("the the the", 3), [6, 15, 7])  # keeps [SEP]


def test_text_pipeline_tokenizes_with_the_tokenizer(tmp_path):
  vocab = wordpiece.load(FIXTURE)
  with tfds.testing.mock_data(num_examples=12):
    source = data.load("glue/sst2", "train", str(tmp_path), tokenizer=FIXTURE)
    batch = next(data.make_train_iterator(source, batch_size=4, seed=0, resolution=LENGTH,
                                          process_index=0, process_count=1, vocab_size=107))
    texts = {source[i]["sentence"].decode() if isinstance(source[i]["sentence"], bytes)
             else str(source[i]["sentence"]) for i in range(len(source))}
    expected = {tuple(vocab.encode(t, LENGTH)) for t in texts}
    assert {tuple(row) for row in batch["inputs"]} <= expected
    assert not os.path.exists(os.path.join(str(tmp_path), "ofajax_vocab"))  # nothing built
    n, batches = evaluation.eval_batches("glue/sst2", "validation", str(tmp_path), 8, LENGTH,
                                         vocab_size=107, tokenizer=FIXTURE)
    assert n == 12 and next(batches)["inputs"][0, 0] == vocab.cls_id
    with pytest.raises(ValueError, match="107 ids, more than the model's vocab_size 64"):
      data.make_train_iterator(source, batch_size=4, seed=0, process_index=0, process_count=1,
                               vocab_size=64)
  with pytest.raises(FileNotFoundError, match="tokenizer file"):
    data.load("glue/sst2", "train", str(tmp_path), tokenizer=str(tmp_path / "nope.json"))
  with pytest.raises(ValueError, match="for text data sets"):
    data.load("digits", "train", str(tmp_path), tokenizer=FIXTURE)


# --------------------------------------------------------------------------- errors


def test_missing_directory_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_bert.load(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    hf_bert.load(str(tmp_path))
  directory = _copy_fixture(tmp_path, drop=("model.safetensors", "pytorch_model.bin"))
  with pytest.raises(FileNotFoundError, match="has no weights"):
    hf_bert.load(directory)


def _edit_config(directory, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "roberta"}, "model_type is 'roberta', not 'bert': not a BERT checkpoint"),
    ({"hidden_act": "gelu_new"}, "hidden_act is 'gelu_new'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"problem_type": "regression"}, "single-label"),
    ({"id2label": {"0": "a", "1": "b", "2": "c"}}, r"classifier.weight has shape \[2, 32\]; "
                                                   r"its config.json implies \[3, 32\]"),
])
def test_a_config_elastic_bert_cannot_reproduce_is_refused(tmp_path, changes, match):
  directory = _copy_fixture(tmp_path)
  _edit_config(directory, **changes)
  with pytest.raises(ValueError, match=match):
    hf_bert.load(directory)


def test_missing_and_unexpected_weights_are_named(imported):
  sd = hf_bert.load_state_dict(os.path.join(FIXTURE, "model.safetensors"))
  missing = {k: v for k, v in sd.items() if k != "bert.encoder.layer.1.output.dense.weight"}
  with pytest.raises(hf_bert.CheckpointError,
                     match="has no tensor 'bert.encoder.layer.1.output.dense.weight'"):
    hf_bert.from_state_dict(missing, imported.options)
  extra = dict(sd, **{"cls.predictions.bias": np.zeros(107, np.float32)})
  with pytest.raises(hf_bert.CheckpointError, match="no place for.*cls.predictions.bias"):
    hf_bert.from_state_dict(extra, imported.options)


def test_pickle_with_code_or_old_format_is_refused(tmp_path):
  legacy = tmp_path / "pytorch_model.bin"
  legacy.write_bytes(b"\x80\x02not a zip")
  with pytest.raises(ValueError, match="not in torch's zip format"):
    torch_zip.load(str(legacy))
  # a torch.save zip whose pickle names a global outside the whitelist (here os.system)
  import zipfile  # pylint: disable=g-import-not-at-top
  evil = tmp_path / "evil.bin"
  with zipfile.ZipFile(evil, "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85R.")
  with pytest.raises(ValueError, match="holds a os.system"):
    torch_zip.load(str(evil))


def test_dataset_with_other_labels_is_refused(imported):
  base = dynabert_sst2.get_config("full")
  with pytest.raises(ValueError, match="3 labels, but glue/sst2 has 2 classes"):
    hf_bert.imported_config(base, imported._replace(options={**imported.options,
                                                             "num_classes": 3}))


# --------------------------------------------------------------------------- workdir + CLI


def test_cli_writes_a_workdir_that_loads_back(tmp_path, imported, reference):
  workdir = str(tmp_path / "imported")
  cmd = [sys.executable, "convert_hf_bert.py", f"--checkpoint={FIXTURE}", f"--workdir={workdir}",
         "--config=configs/dynabert_sst2.py:full"]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-3000:]
  assert "--config.model_options.vocab_size=107" in run.stdout
  assert f"--config.tokenizer={workdir}/tokenizer/tokenizer.json" in run.stdout
  sup = load_supernet(workdir)
  assert sup.config.model == "elastic_bert" and sup.config.tokenizer.endswith("tokenizer.json")
  assert sup.config.dataset == "glue/sst2" and sup.space.largest()["depth"] == 2
  jax.tree.map(np.testing.assert_array_equal, sup.variables["params"],
               imported.variables["params"])
  vocab = wordpiece.load(sup.config.tokenizer)  # the copy in the workdir
  ids = np.stack([vocab.encode(s, LENGTH) for s in reference["sentences"]])
  np.testing.assert_array_equal(ids, reference["ids"])
  with pytest.raises(FileExistsError, match="already holds checkpoint"):
    hf_bert.write_workdir(imported, workdir, dynabert_sst2.get_config("full"))
