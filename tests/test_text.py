"""Text pipeline (ofajax.data.text via ofajax.data): tokenizer, vocabulary cache, iterators, and
glue/sst2 end to end (training + search) under tfds.testing.mock_data.

Mocking: `tfds.testing.mock_data` patches `tfds.data_source` without TensorFlow (policy AUTO
falls back to USE_CODE: the builder's features, random examples). Mocked sentences are random
strings over " abcdefghij" and every split, sliced or not, has `num_examples` examples (the same
ones). glue is not registered with TFDS until `tensorflow_datasets.text.glue` is imported, which
`data.load` does (TextSpec.builder_module).
"""

import json
import os
import warnings

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from configs.search import autoslim
from ofajax import data
from ofajax import train as training
from ofajax.search.run import run_search
from ofajax.data import CLS, PAD, SEP, UNK, Vocabulary, text

N = 40  # mocked examples per split
ONE = dict(process_index=0, process_count=1)


@pytest.fixture
def mocked(tmp_path):
  """A fresh data_dir (the vocabulary cache lands there) with TFDS mocked."""
  with tfds.testing.mock_data(num_examples=N):
    yield str(tmp_path)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------------------------------------
# Tokenizer and vocabulary.


def test_tokenize_and_encode():
  assert data.tokenize("Hello, World! It's 2x") == ["hello", ",", "world", "!", "it", "'", "s",
                                                    "2x"]
  assert data.tokenize(b"Caf\xc3\xa9  ok") == ["café", "ok"]
  # Frequency order (a: 3, c: 2), ties alphabetically (b, d: 1), cut at vocab_size.
  vocab = Vocabulary.build(["b a c", "a c", "d a"], vocab_size=7)
  assert vocab.tokens == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "c", "b"]
  assert vocab == Vocabulary.build(["d a", "a c", "b a c"], vocab_size=7)  # order-independent
  assert len(Vocabulary.build(["a"], vocab_size=100)) == 5  # fewer words than room
  np.testing.assert_array_equal(vocab.encode("A c zz", 8), [CLS, 4, 5, UNK, SEP, PAD, PAD, PAD])
  np.testing.assert_array_equal(vocab.encode("a c b a c", 4), [CLS, 4, 5, SEP])  # keeps [SEP]
  np.testing.assert_array_equal(vocab.encode("", 3), [CLS, SEP, PAD])
  np.testing.assert_array_equal(vocab.encode("a", 1), [CLS])
  assert vocab.encode("a", 5).dtype == np.int32
  assert vocab.decode(vocab.encode("a zz", 6)) == "[CLS] a [UNK] [SEP]"
  with pytest.raises(ValueError, match="special"):
    Vocabulary.build(["a"], vocab_size=4)
  with pytest.raises(ValueError, match="starts with"):
    Vocabulary(["a", "b"])


def test_spec_lookups():
  for name in ("glue/sst2", "glue/sst2:2.0.0", "glue/sst2/2.0.0"):
    assert data.spec_key(name) == "glue/sst2"
  assert data.spec_key("imdb_reviews/plain_text/1.0.0") == "imdb_reviews"
  assert data.spec_key("cifar10:3.0.2") == "cifar10"
  assert data.spec_key("glue/cola") is None
  spec = data.DATASETS["glue/sst2"]
  assert isinstance(spec, data.TextSpec) and spec.num_classes == 2
  assert (spec.text_key, spec.train_split, spec.eval_split) == ("sentence", "train", "validation")
  assert data.DATASETS["imdb_reviews"].text_key == "text"


def test_vocabulary_built_once_cached_and_rebuilt_when_corrupt(mocked):
  path = data.vocab_path("glue/sst2", mocked, 64)
  assert path == os.path.join(mocked, "ofajax_vocab", "glue_sst2-train-64.json")
  vocab = data.vocabulary("glue/sst2", mocked, 64)
  assert len(vocab) == 64 and vocab.tokens[:4] == list(data.SPECIALS)
  saved = json.load(open(path))
  assert saved["tokens"] == vocab.tokens and saved["num_examples"] == N
  # From the training split, whichever split is read, and by frequency: recount it.
  src = data.load("glue/sst2", "validation", mocked)
  assert src.vocabulary(64) == vocab
  counts = {}
  for i in range(N):
    for w in data.tokenize(data.load("glue/sst2", "train", mocked)[i]["sentence"]):
      counts[w] = counts.get(w, 0) + 1
  assert vocab.tokens[4:] == sorted(counts, key=lambda w: (-counts[w], w))[:60]
  # Read back from the cache (not rebuilt: a planted cache is returned as is).
  planted = list(data.SPECIALS) + ["zz"]
  json.dump(dict(saved, tokens=planted), open(path, "w"))
  assert data.vocabulary("glue/sst2", mocked, 64).tokens == planted
  # A corrupt cache is rebuilt, with a warning naming it.
  for bad in ("{not json", json.dumps(dict(saved, tokens=["a", "b"])),
              json.dumps(dict(saved, vocab_size=10))):
    open(path, "w").write(bad)
    with pytest.warns(UserWarning, match="ofajax_vocab"):
      assert data.vocabulary("glue/sst2", mocked, 64) == vocab
    assert json.load(open(path))["tokens"] == vocab.tokens
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert data.vocabulary("glue/sst2", mocked, 64) == vocab


# ---------------------------------------------------------------------------------------------
# Iterators.


def test_train_iterator_contract(mocked):
  src = data.load("glue/sst2", "train", mocked)
  assert isinstance(src, data.TextSource) and len(src) == N
  kw = dict(batch_size=8, seed=3, resolution=16, vocab_size=64)
  it = data.make_train_iterator(src, **kw, **ONE)
  assert it.steps_per_epoch == N // 8 and it.vocab_size == 64 and it.resolution == 16
  batches = [next(it) for _ in range(7)]  # crosses an epoch
  for b in batches:
    assert set(b) == {"inputs", "label"}
    assert b["inputs"].shape == (8, 16) and b["inputs"].dtype == np.int32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    tokens = b["inputs"]
    assert (tokens[:, 0] == CLS).all() and tokens.min() >= 0 and tokens.max() < 64
    for row in tokens:  # [CLS] ... [SEP] then only padding
      sep = int(np.flatnonzero(row == SEP)[0])
      words = row[1:sep]
      assert ((words == UNK) | (words > SEP)).all() and (row[sep + 1:] == PAD).all()
    assert set(b["label"].tolist()) <= {0, 1}
  # The documented order: epoch e = default_rng([seed, e]).permutation(n), as image data.
  vocab = it.vocabulary
  for step in (0, 6):
    epoch, b = divmod(step, N // 8)
    rows = np.random.default_rng([3, epoch]).permutation(N)[b * 8:(b + 1) * 8]
    np.testing.assert_array_equal(
        batches[step]["inputs"], np.stack([vocab.encode(src[i]["sentence"], 16) for i in rows]))
    np.testing.assert_array_equal(batches[step]["label"], [int(src[i]["label"]) for i in rows])
  # Deterministic; start_step resumes exactly; process slices partition the global batch; the
  # grain (threaded, example by example) path equals the in-memory one.
  again = data.make_train_iterator(src, **kw, **ONE)
  for b in batches:
    assert_batches_equal(next(again), b)
  resumed = data.make_train_iterator(src, **kw, start_step=4, **ONE)
  for b in batches[4:]:
    assert_batches_equal(next(resumed), b)
  halves = [data.make_train_iterator(src, **kw, start_step=5, process_index=p, process_count=2)
            for p in (0, 1)]
  for b in batches[5:]:
    parts = [next(h) for h in halves]
    assert_batches_equal({k: np.concatenate([p[k] for p in parts]) for k in b}, b)
  threaded = data.make_train_iterator(src, **kw, in_memory=False, num_threads=2, **ONE)
  for b in batches[:3]:
    assert_batches_equal(next(threaded), b)
  # Default length: the spec's max_length.
  assert next(data.make_train_iterator(src, batch_size=8, seed=0, vocab_size=64, **ONE))[
      "inputs"].shape == (8, data.DATASETS["glue/sst2"].max_length)


def test_eval_iterator_pads_with_mask(mocked):
  src = data.load("glue/sst2", "validation", mocked)
  kw = dict(batch_size=16, resolution=12, vocab_size=64)
  ev = list(data.make_eval_iterator(src, **kw, **ONE))
  assert [int(e["mask"].sum()) for e in ev] == [16, 16, 8]
  assert all(e["inputs"].shape == (16, 12) and e["inputs"].dtype == np.int32 for e in ev)
  assert ev[-1]["mask"].dtype == np.bool_
  pad = ev[-1]["inputs"][~ev[-1]["mask"]]
  np.testing.assert_array_equal(pad, np.tile([CLS, SEP] + [PAD] * 10, (8, 1)))
  assert (ev[-1]["label"][~ev[-1]["mask"]] == 0).all()
  vocab = data.vocabulary("glue/sst2", mocked, 64)
  np.testing.assert_array_equal(np.concatenate([e["inputs"] for e in ev])[:N],
                                np.stack([vocab.encode(src[i]["sentence"], 12) for i in range(N)]))
  # Two processes: each takes its contiguous half of every global batch.
  halves = [list(data.make_eval_iterator(src, **kw, process_index=p, process_count=2))
            for p in (0, 1)]
  for e, a, b in zip(ev, *halves):
    assert_batches_equal({k: np.concatenate([a[k], b[k]]) for k in e}, e)


def test_other_text_set_and_errors(mocked):
  src = data.load("imdb_reviews", "test", mocked)  # text_key "text"
  b = next(data.make_train_iterator(src, batch_size=4, seed=0, resolution=32, vocab_size=50,
                                    **ONE))
  assert b["inputs"].shape == (4, 32) and b["inputs"].max() < 50
  sst2 = data.load("glue/sst2", "train", mocked)
  with pytest.raises(ValueError, match="augment='none'"):
    data.make_train_iterator(sst2, batch_size=8, seed=0, augment="cifar", vocab_size=64, **ONE)
  with pytest.raises(ValueError, match="image data sets"):
    data.make_eval_iterator(sst2, batch_size=8, mean=(0.5,), std=(0.5,), vocab_size=64, **ONE)
  with pytest.raises(ValueError, match="vocab_size is for text"):
    data.make_eval_iterator([], batch_size=8, dataset="digits", vocab_size=64, **ONE)
  it = data.make_train_iterator(sst2, batch_size=8, seed=0, vocab_size=64, **ONE)
  data.check_vocab(it, 64)
  with pytest.raises(ValueError, match="model's vocabulary has 32 entries"):
    data.check_vocab(it, 32)
  # Unlabelled splits (glue's test split: label -1) are refused, naming the way out.
  unlabelled = [{"sentence": "a b", "label": -1}] * 4
  for in_memory in (True, False):
    with pytest.raises(ValueError, match="'validation'"):
      next(text.make_eval_iterator(
          unlabelled, batch_size=4, dataset=data.DATASETS["glue/sst2"],
          vocab=Vocabulary.build(["a b"], 8), in_memory=in_memory, num_threads=0, **ONE))


def test_missing_text_dataset_names_the_build_command(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.load("glue/sst2", "train", tmp_path)
  msg = str(e.value)
  for part in ("'glue/sst2'", os.path.join(str(tmp_path), "glue/sst2"),
               f"tfds build glue/sst2 --data_dir {tmp_path} --file_format array_record"):
    assert part in msg, msg
  with pytest.raises(data.DatasetNotPreparedError, match="tfds build imdb_reviews"):
    data.load("imdb_reviews", "train", tmp_path)
  # The vocabulary is built from the training split, so it needs the data set too.
  with pytest.raises(data.DatasetNotPreparedError, match="tfds build glue/sst2"):
    data.vocabulary("glue/sst2", tmp_path, 64)


# ---------------------------------------------------------------------------------------------
# End to end: elastic_bert_tiny on (mocked) glue/sst2, trained, evaluated and searched.


def tiny_text_config(data_dir: str) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.model = "elastic_bert_tiny"
  c.execution = "masked"  # compiles faster; execution modes have their own tests
  # The pipeline's vocabulary has model_options.vocab_size ids (the trainer passes the model's
  # vocab_size to the data iterators).
  c.model_options = ml_collections.ConfigDict({"num_classes": 2, "vocab_size": 64})
  c.dataset, c.data_dir = "glue/sst2", data_dir
  # glue/sst2's test labels are -1; the last 32 training sentences are held out for search
  c.train_split, c.holdout, c.test_split = "train[:-32]", 32, "validation"
  c.resolution = 16  # sequence length
  c.augment = "none"
  c.optimizer, c.learning_rate, c.weight_decay, c.label_smoothing = "adamw", 1e-3, 0.01, 0.0
  c.batch_size = 8
  c.num_epochs = 4 / ((N - 32) // 8)  # 4 steps
  c.phases[0].warmup_epochs = 0.0
  c.log_every_steps = c.checkpoint_every_steps = 2
  c.eval.num_random_subnets = 1
  c.eval.calib_batches, c.eval.calib_batch_size, c.eval.batch_size = 1, 8, 16
  return c


def test_elastic_bert_sst2_end_to_end(mocked, tmp_path):
  workdir = str(tmp_path / "work")
  records = training.train_and_evaluate(tiny_text_config(mocked), workdir)
  assert [r["name"] for r in records[:2]] == ["largest", "smallest"] and len(records) == 3
  assert all(0.0 <= r["top1"] <= 1.0 for r in records)
  assert records[0]["macs"] > records[1]["macs"] > 0
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(np.isfinite(l["loss"]) for l in lines if "loss" in l)
  assert os.path.exists(os.path.join(mocked, "ofajax_vocab", "glue_sst2-train-64.json"))

  search = autoslim.get_config()
  search.calib_split, search.calib_batches, search.calib_batch_size = "train[:32]", 1, 8
  search.valid_split, search.valid_batch_size = "train[-32:]", 16
  search.target_fractions = (0.6,)
  search.engine.chunk_size = 4
  search.export = False
  result = run_search(search, workdir)
  assert len(result["chosen"]) == 1
  row = result["chosen"][0]
  assert row["macs"] <= row["target_macs"] and 0.0 <= row["top1"] <= 1.0
  assert 0.0 <= row["test_top1"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "search", "autoslim", "result.json"))
