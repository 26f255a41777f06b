"""A Hugging Face WordPiece tokenizer as the text pipeline's vocabulary (the `tokenizers` package).

A model imported from Hugging Face (`ofajax.convert.hf_bert`) has learned embeddings for its
own WordPiece ids, so its data must be tokenized as it was in fine-tuning, not with ofajax's
word-level vocabulary. `load(path)` reads

- a `tokenizer.json` (HF's whole pipeline: normalizer, pre-tokenizer, WordPiece model), or
- a BERT `vocab.txt`, tokenized as HF's BertTokenizer does (clean text, split CJK characters,
  lowercase and strip accents unless the `tokenizer_config.json` beside it says
  `do_lower_case: false`), or
- a directory holding either (a checkpoint directory: tokenizer.json preferred),

into a `WordPieceVocabulary`, which `TextReader` uses as it uses a `text.Vocabulary`:
`encode(text, T)` is [CLS] pieces [SEP] [PAD] ..., the pieces cut to T - 2, as HF's
`tokenizer(text, truncation=True, max_length=T, padding="max_length")` gives. The special
tokens are looked up by BERT's names, so their ids are the tokenizer's own ([CLS] is 101 in
bert-base-uncased).
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]"}


def as_str(text) -> str:
  """A record's text field (numpy scalar, bytes or str) as a Python str, UTF-8 decoded."""
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, (bytes, np.bytes_)):
    text = bytes(text).decode("utf-8")
  return str(text)


class WordPieceVocabulary:
  """`encode` / `decode` / `len` / `tokens` over a `tokenizers` tokenizer (see the module doc)."""

  def __init__(self, tokenizer, path: str):
    self.tokenizer, self.path = tokenizer, path
    ids = {k: tokenizer.token_to_id(t) for k, t in SPECIALS.items()}
    missing = [SPECIALS[k] for k, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"tokenizer {path} has no {missing} token(s): not a BERT WordPiece "
                       "vocabulary")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id = (ids[k] for k in SPECIALS)

  def __len__(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def __eq__(self, other) -> bool:
    return isinstance(other, WordPieceVocabulary) and self.path == other.path

  def __hash__(self) -> int:
    return hash(self.path)

  @property
  def tokens(self) -> list[str]:
    """Token strings by id."""
    return [self.tokenizer.id_to_token(i) for i in range(len(self))]

  def pieces(self, text) -> list[int]:
    """The WordPiece ids of ``text``, without special tokens or truncation."""
    return self.tokenizer.encode(as_str(text), add_special_tokens=False).ids

  def encode(self, text, length: int) -> np.ndarray:
    """int32 [length]: [CLS] piece ids [SEP], pieces cut to length - 2, then [PAD]s."""
    if length < 1:
      raise ValueError(f"sequence length must be >= 1, got {length}")
    seq = ([self.cls_id] + self.pieces(text)[:max(0, length - 2)] + [self.sep_id])[:length]
    out = np.full((length,), self.pad_id, np.int32)
    out[:len(seq)] = seq
    return out

  def decode(self, ids) -> str:
    """Space-joined tokens of ``ids``, padding dropped (pieces keep their ## marks)."""
    return " ".join(self.tokenizer.id_to_token(int(i)) for i in np.asarray(ids).reshape(-1)
                    if int(i) != self.pad_id)

  def __repr__(self) -> str:
    return f"WordPieceVocabulary({self.path!r}, {len(self)} ids)"


def resolve(path: str) -> str:
  """The tokenizer file ``path`` names: itself, or a directory's tokenizer.json / vocab.txt."""
  if os.path.isdir(path):
    for name in ("tokenizer.json", "vocab.txt"):
      if os.path.exists(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"tokenizer directory {path!r} has no tokenizer.json or vocab.txt")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist (config.tokenizer: a "
                            "tokenizer.json, a vocab.txt or a directory holding one)")
  return path


def _bert_options(vocab_txt: str) -> dict:
  """BertTokenizer's normalisation options from the tokenizer_config.json beside vocab.txt."""
  path = os.path.join(os.path.dirname(vocab_txt), "tokenizer_config.json")
  config = {}
  if os.path.exists(path):
    with open(path) as f:
      config = json.load(f)
  return {"lowercase": bool(config.get("do_lower_case", True)),
          "strip_accents": config.get("strip_accents"),
          "handle_chinese_chars": bool(config.get("tokenize_chinese_chars", True))}


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> WordPieceVocabulary:
  del mtime_ns  # part of the key: a rewritten file is read again
  import tokenizers  # pylint: disable=g-import-not-at-top (only runs that use a tokenizer)
  if path.endswith(".json"):
    tokenizer = tokenizers.Tokenizer.from_file(path)
    tokenizer.no_truncation()   # encode() truncates and pads itself, as the word-level one does
    tokenizer.no_padding()
  else:
    tokenizer = tokenizers.BertWordPieceTokenizer(path, **_bert_options(path))
  return WordPieceVocabulary(tokenizer, path)


def load(path: str) -> WordPieceVocabulary:
  """The WordPiece vocabulary of a tokenizer.json, a vocab.txt or a directory (module doc)."""
  path = os.path.abspath(resolve(path))
  try:
    return _load(path, os.stat(path).st_mtime_ns)
  except Exception as e:  # tokenizers raises its own kinds on a malformed file; name the file
    if isinstance(e, (ValueError, FileNotFoundError)):
      raise
    raise ValueError(f"tokenizer {path} could not be read ({type(e).__name__}: {e})") from e
