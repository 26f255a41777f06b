"""Layer 5: text classification data. TFDS text data sets -> int32 token ids, no TensorFlow needed.

The same contract as the image pipeline (`ofajax.data.load`, `make_train_iterator` and
`make_eval_iterator` dispatch here when the data set's spec is a `TextSpec`):

  load(name, split)                  -> TextSource (random access; records as TFDS stores them)
  make_train_iterator(source, ...)   -> endless, deterministic, per-process batches
  make_eval_iterator(source, ...)    -> one ordered pass, last batch padded + "mask"

Batches are {"inputs": int32 [b, T] token ids, "label": int32 [b]} (+ "mask": bool [b] for
eval). The sequence length T plays the role of the resolution (`resolution=`; default the spec's
max_length). The order of examples, the process slices and resuming from `start_step` are
exactly those of the image pipeline (the same code: `ofajax.data.batching`, which reads a
`TextReader` as it reads an image reader).

Tokenizer: deterministic, word level. `tokenize` lowercases and splits into words (`\\w+`) and
single punctuation characters. Ids: 0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP], then the most frequent
words of the data set's *training* split (spec.train_split, whatever split is being read), ties
broken alphabetically, up to vocab_size ids in all. `encode(text, T)` gives
[CLS] w1 ... wk [SEP] 0 ... 0: words past T - 2 are dropped ([SEP] is kept), the rest is padding.

The vocabulary is built once per (data set, vocab_size) by reading the training split and cached
as JSON in `<data_dir>/ofajax_vocab/<name with / as _>-<split>-<vocab_size>.json` (written
atomically, so concurrent processes are safe: they build the same file). A missing cache is
rebuilt; an unreadable or inconsistent one (bad JSON, wrong format, wrong specials, wrong size,
duplicate tokens) is rebuilt too, with a warning naming the file: it is a pure function of the
data, so rebuilding is always correct.

WordPiece: `load(name, split, data_dir, tokenizer=path)` (train.py: `config.tokenizer`) makes the
iterators tokenize with a Hugging Face tokenizer.json or vocab.txt instead
(`ofajax.data.wordpiece`), for a model imported from Hugging Face, whose embeddings belong to
its WordPiece ids. Nothing is built or cached then; the ids and [PAD] are the tokenizer's.

Vocabulary size and the model: the iterators take `vocab_size=` (default: the spec's); pass the
model's embedding size (`model.vocab_size`, i.e. `config.model_options.vocab_size` or the model
preset's default). Every id is then < vocab_size by construction. `check_vocab(batches,
model_vocab_size)` raises a clear error when a pipeline's ids could exceed a model's vocabulary.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import tempfile
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from ofajax.data import batching, builders, registry, wordpiece
from ofajax.data.registry import TextSpec

PAD, UNK, CLS, SEP = 0, 1, 2, 3
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
VOCAB_FORMAT = "ofajax-word-vocab-1"
_WORDS = re.compile(r"\w+|[^\w\s]")


# ------------------------------------------------------------------------------------------------
# Tokenizer and vocabulary.


def tokenize(text) -> list[str]:
  """Lowercased words (`\\w+`) and punctuation characters, in order; bytes are read as UTF-8."""
  return _WORDS.findall(wordpiece.as_str(text).lower())


def _check_vocab_size(vocab_size: int) -> None:
  if vocab_size <= len(SPECIALS):
    raise ValueError(f"vocab_size must exceed the {len(SPECIALS)} special tokens, got {vocab_size}")


class Vocabulary:
  """Token strings by id: the four SPECIALS, then words. `encode` / `decode` / `len`."""

  def __init__(self, tokens: Sequence[str]):
    tokens = list(tokens)
    if tuple(tokens[:len(SPECIALS)]) != SPECIALS:
      raise ValueError(f"a vocabulary starts with {SPECIALS}, got {tokens[:len(SPECIALS)]}")
    if len(set(tokens)) != len(tokens):
      raise ValueError("a vocabulary has no duplicate tokens")
    self.tokens = tokens
    self.ids = {t: i for i, t in enumerate(tokens)}

  def __len__(self) -> int:
    return len(self.tokens)

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and self.tokens == other.tokens

  @classmethod
  def build(cls, texts: Iterable, vocab_size: int) -> "Vocabulary":
    """The vocab_size - 4 most frequent words of `texts` (ties alphabetically) after SPECIALS."""
    _check_vocab_size(vocab_size)
    counts = collections.Counter()
    for text in texts:
      counts.update(tokenize(text))
    words = sorted((w for w in counts if w not in SPECIALS), key=lambda w: (-counts[w], w))
    return cls(list(SPECIALS) + words[:vocab_size - len(SPECIALS)])

  def encode(self, text, length: int) -> np.ndarray:
    """int32 [length]: [CLS] word ids [SEP], truncated to length (keeping [SEP]), 0-padded."""
    if length < 1:
      raise ValueError(f"sequence length must be >= 1, got {length}")
    ids = [self.ids.get(w, UNK) for w in tokenize(text)][:max(0, length - 2)]
    out = np.full((length,), PAD, np.int32)
    seq = ([CLS] + ids + [SEP])[:length]
    out[:len(seq)] = seq
    return out

  def decode(self, ids) -> str:
    """Space-joined tokens of `ids`, padding dropped."""
    return " ".join(self.tokens[int(i)] for i in np.asarray(ids).reshape(-1) if int(i) != PAD)


def _key(name: str) -> str:
  return registry.spec_key(name) or name


def vocab_path(name: str, data_dir, vocab_size: int, split: str | None = None) -> str:
  """Where the vocabulary of `name` (built from `split`, default the spec's train split) is
  cached: <data_dir>/ofajax_vocab/<name, "/" and ":" as "_">-<split>-<vocab_size>.json."""
  name, split = _key(name), split or registry.text_spec(name).train_split
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{split}-{vocab_size}")
  return os.path.join(registry.resolve_data_dir(data_dir), "ofajax_vocab", safe + ".json")


def _read_cache(path: str, vocab_size: int) -> Vocabulary | None:
  """The cached vocabulary, or None (with a warning) when the file is not a valid one."""
  try:
    with open(path, encoding="utf-8") as f:
      content = json.load(f)
    if content.get("format") != VOCAB_FORMAT or content.get("vocab_size") != vocab_size:
      raise ValueError(f"format {content.get('format')!r} / vocab_size "
                       f"{content.get('vocab_size')!r}, expected {VOCAB_FORMAT!r} / {vocab_size}")
    vocab = Vocabulary(content["tokens"])
    if len(vocab) > vocab_size:
      raise ValueError(f"{len(vocab)} tokens for vocab_size {vocab_size}")
    return vocab
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    warnings.warn(f"ignoring the unreadable vocabulary cache {path} ({type(e).__name__}: {e}); "
                  "rebuilding it from the training split")
    return None


def _write_cache(path: str, vocab: Vocabulary, name: str, split: str, vocab_size: int,
                 num_examples: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  content = {"format": VOCAB_FORMAT, "dataset": name, "split": split, "vocab_size": vocab_size,
             "num_examples": num_examples, "tokenizer": "lowercase, regex \\w+|[^\\w\\s]",
             "tokens": vocab.tokens}
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".vocab-", suffix=".json")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(content, f, ensure_ascii=False)
    os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@functools.lru_cache(maxsize=16)
def _cached_vocabulary(path: str, mtime_ns: int, vocab_size: int) -> Vocabulary | None:
  del mtime_ns  # part of the key: a rewritten file is read again
  return _read_cache(path, vocab_size)


def vocabulary(name: str, data_dir=None, vocab_size: int | None = None) -> Vocabulary:
  """The vocabulary of text data set `name`: read from its JSON cache in data_dir, or built from
  the spec's training split (read as `ofajax.data.load` reads it, so a missing data set raises
  DatasetNotPreparedError) and cached. vocab_size: default the spec's."""
  spec = registry.text_spec(name)
  vocab_size = int(vocab_size or spec.vocab_size)
  _check_vocab_size(vocab_size)
  path = vocab_path(name, data_dir, vocab_size)
  if os.path.exists(path):
    vocab = _cached_vocabulary(path, os.stat(path).st_mtime_ns, vocab_size)
    if vocab is not None:
      return vocab
  source = builders.load_source(name, spec.train_split, data_dir)
  texts = (source[i][spec.text_key] for i in range(len(source)))
  vocab = Vocabulary.build(texts, vocab_size)
  _write_cache(path, vocab, _key(name), spec.train_split, vocab_size, len(source))
  return vocab


def check_vocab(batches, model_vocab_size: int) -> None:
  """Raises ValueError if `batches` (a text iterator) could yield ids >= model_vocab_size."""
  size = getattr(batches, "vocab_size", None)
  if size is not None and int(size) > int(model_vocab_size):
    raise ValueError(
        f"the text pipeline's token ids go up to {int(size) - 1} (vocab_size {size}) but the "
        f"model's vocabulary has {model_vocab_size} entries: pass vocab_size=model.vocab_size to "
        "the data iterators, or set config.model_options.vocab_size to at least that")


# ------------------------------------------------------------------------------------------------
# Sources and reader.


class TextSource:
  """A TFDS random-access source of a text data set plus what finds its vocabulary: the data
  set name and data_dir, or a WordPiece `tokenizer` file. `len` and `[i]` are the underlying
  source's (raw records)."""

  def __init__(self, source, name: str, data_dir: str, spec: TextSpec, split: str,
               tokenizer: str | None = None):
    self.source, self.name, self.data_dir, self.spec, self.split = (source, name, data_dir, spec,
                                                                    split)
    self.tokenizer = tokenizer

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[int(i)]

  @property
  def dataset_info(self):
    return getattr(self.source, "dataset_info", None)

  def vocabulary(self, vocab_size: int | None = None):
    """The data set's word-level `Vocabulary`, or the `tokenizer`'s WordPiece vocabulary."""
    if self.tokenizer:
      return wordpiece.load(self.tokenizer)
    return vocabulary(self.name, self.data_dir, vocab_size)

  def __repr__(self) -> str:
    return f"TextSource({self.name!r}, split={self.split!r}, n={len(self)})"


def load(name: str, split: str, data_dir=None, tokenizer: str | None = None) -> TextSource:
  """A split of the text data set `name` (see `builders.load_source`) as a TextSource;
  `tokenizer`: a WordPiece tokenizer.json / vocab.txt (or a directory holding one) to tokenize
  with instead of the data set's word-level vocabulary (checked here, before any reading)."""
  if tokenizer:
    wordpiece.resolve(tokenizer)
  data_dir = registry.resolve_data_dir(data_dir)
  source = builders.load_source(name, split, data_dir)
  return TextSource(source, registry.spec_key(name), data_dir, registry.text_spec(name), split,
                    tokenizer or None)


class TextReader:
  """The `batching.Reader` of a text split: (int32 [T] token ids, int label) by index; the whole
  split encoded in memory for small ones."""

  def __init__(self, source, vocab: Vocabulary, length: int, text_key: str, label_key: str,
               num_classes: int, in_memory: bool, name: str):
    self.source, self.vocab, self.length = source, vocab, length
    self.text_key, self.label_key, self.num_classes, self.name = (text_key, label_key,
                                                                  num_classes, name)
    self.n, self.in_memory = len(source), in_memory
    self._empty = vocab.encode("", length)
    if in_memory:
      records = [source[i] for i in range(self.n)]
      self.tokens = np.stack([vocab.encode(r[text_key], length) for r in records]) if records \
          else np.zeros((0, length), np.int32)
      self.labels = np.array([int(r[label_key]) for r in records], np.int32)
      bad = np.flatnonzero((self.labels < 0) | (self.labels >= num_classes))
      if bad.size:
        self._bad_label(int(bad[0]), int(self.labels[bad[0]]))

  def _bad_label(self, i: int, label: int):
    raise ValueError(
        f"example {i} of {self.name} has label {label}, outside [0, {self.num_classes}); "
        "unlabelled splits (e.g. glue's test splits, label -1) cannot be used for training or "
        "evaluation: use the data set's eval_split (glue: 'validation')")

  def __len__(self) -> int:
    return self.n

  def example(self, index: int, rng_key: tuple[int, ...] | None) -> tuple[np.ndarray, int]:
    del rng_key  # text has no augmentation
    if self.in_memory:
      return self.tokens[index], int(self.labels[index])
    r = self.source[int(index)]
    label = int(r[self.label_key])
    if not 0 <= label < self.num_classes:
      self._bad_label(int(index), label)
    return self.vocab.encode(r[self.text_key], self.length), label

  def padding(self) -> np.ndarray:
    """The encoding of the empty text ([CLS] [SEP] 0 ...: every row has a token to attend to)."""
    return self._empty.copy()


# ------------------------------------------------------------------------------------------------
# Iterators.


def _vocab_for(name, spec: TextSpec, source, vocab: Vocabulary | None,
               vocab_size: int | None) -> tuple[Vocabulary, int]:
  """(vocabulary, vocab_size): `vocab` if given, else the source's WordPiece tokenizer (both
  checked against vocab_size), else the data set's cached vocabulary of vocab_size (default the
  spec's) ids."""
  if vocab is None and getattr(source, "tokenizer", None):
    vocab = wordpiece.load(source.tokenizer)
    if vocab_size is not None and len(vocab) > vocab_size:
      raise ValueError(f"tokenizer {vocab.path} has {len(vocab)} ids, more than the model's "
                       f"vocab_size {vocab_size}: set config.model_options.vocab_size to at "
                       "least that (the checkpoint's vocab_size)")
  elif vocab is None:
    if name is None:
      raise ValueError("no vocabulary: pass vocab= (an ofajax.data.Vocabulary) or a source from "
                       "ofajax.data.load")
    vocab_size = int(vocab_size or spec.vocab_size)
    vocab = vocabulary(name, getattr(source, "data_dir", None), vocab_size)
  elif vocab_size is not None and len(vocab) > vocab_size:
    raise ValueError(f"the vocabulary given has {len(vocab)} ids, more than vocab_size "
                     f"{vocab_size}")
  return vocab, int(vocab_size or len(vocab))


def _setup(source, dataset, *, resolution, vocab_size, vocab, in_memory, num_threads, label_key,
           text_key, process_index, process_count, batch_size):
  """(reader, vocab_size, p, local, num_threads) of a text split."""
  if isinstance(dataset, TextSpec):
    spec, name = dataset, getattr(source, "name", None)
  else:
    name = dataset or getattr(source, "name", None)
    spec = registry.text_spec(name) if name is not None else getattr(source, "spec", None)
  if spec is None:
    raise ValueError("unknown text data set: pass dataset= (a registered name or a TextSpec)")
  vocab, vocab_size = _vocab_for(name, spec, source, vocab, vocab_size)
  p, _, local = batching.process_slice(batch_size, process_index, process_count)
  in_memory, num_threads = batching.read_options(len(source), in_memory, num_threads)
  reader = TextReader(source, vocab, int(resolution or spec.max_length),
                      text_key or spec.text_key, label_key or spec.label_key, spec.num_classes,
                      in_memory, name or "the text source")
  return reader, vocab_size, p, local, num_threads


def make_train_iterator(source, *, batch_size: int, seed: int, resolution: int | None = None,
                        augment: str = "none", dataset: str | TextSpec | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        start_step: int = 0, in_memory: bool | None = None,
                        num_threads: int | None = None, vocab_size: int | None = None,
                        vocab: Vocabulary | None = None, text_key: str | None = None,
                        label_key: str | None = None) -> batching.Batches:
  """Endless training batches {"inputs": int32 [b, T] token ids, "label": int32 [b]}, b = B / P.

  source: a `TextSource` (from `ofajax.data.load`) or any len() / [i] -> record source with
  dataset= naming the data set (or vocab= given). resolution: the sequence length T (default
  the spec's max_length). Order, process slices and start_step as `ofajax.data
  .make_train_iterator`; augment must be "none". vocab_size: ids are < vocab_size (default the
  spec's); pass the model's vocab_size. The Batches carry `.vocab_size` and `.vocabulary`.
  """
  if augment != "none":
    raise ValueError(f"text data sets have no augmentation: set augment='none' (got {augment!r})")
  reader, vocab_size, p, local, num_threads = _setup(
      source, dataset, resolution=resolution, vocab_size=vocab_size, vocab=vocab,
      in_memory=in_memory, num_threads=num_threads, label_key=label_key, text_key=text_key,
      process_index=process_index, process_count=process_count, batch_size=batch_size)
  return batching.train_batches(reader, batch_size=batch_size, seed=seed, p=p, local=local,
                                start_step=start_step, num_threads=num_threads,
                                resolution=reader.length, vocab_size=vocab_size,
                                vocabulary=reader.vocab)


def make_eval_iterator(source, *, batch_size: int, resolution: int | None = None,
                       dataset: str | TextSpec | None = None, process_index: int | None = None,
                       process_count: int | None = None, in_memory: bool | None = None,
                       num_threads: int | None = None, vocab_size: int | None = None,
                       vocab: Vocabulary | None = None, text_key: str | None = None,
                       label_key: str | None = None) -> batching.Batches:
  """One ordered pass: ceil(n / B) batches {"inputs": int32 [b, T], "label", "mask"} per process.

  As `ofajax.data.make_eval_iterator`: global batch i holds examples [i * B, (i + 1) * B),
  process p its contiguous slice. Positions past the end are padding with mask False, label 0
  and the encoding of the empty text ([CLS] [SEP] 0 ...: every row has a token to attend to).
  """
  reader, vocab_size, p, local, num_threads = _setup(
      source, dataset, resolution=resolution, vocab_size=vocab_size, vocab=vocab,
      in_memory=in_memory, num_threads=num_threads, label_key=label_key, text_key=text_key,
      process_index=process_index, process_count=process_count, batch_size=batch_size)
  return batching.eval_batches(reader, batch_size=batch_size, p=p, local=local,
                               num_threads=num_threads, resolution=reader.length,
                               vocab_size=vocab_size, vocabulary=reader.vocab)
