"""Layer 6: the public entry points. `load`, `make_train_iterator` and `make_eval_iterator`
dispatch on the data set's spec: a `TextSpec` goes to `ofajax.data.text`, anything else to
`ofajax.data.images`. Both build a `batching.Reader` and yield batches with the fields of
`batching.BATCH_FIELDS`.
"""

from __future__ import annotations

from ofajax.data import builders, images, registry, text
from ofajax.data.batching import Batches
from ofajax.data.registry import DataSpec, TextSpec


def load(name: str, split: str, data_dir=None, tokenizer: str | None = None):
  """Random-access source of one split: `tfds.data_source(name, split=split, data_dir=...)`.

  Any TFDS data set prepared in array_record format (mnist_5k and digits are built on first
  use); split strings like "train[:90%]" or "train[-10%:]" work. Never downloads: a missing data
  set raises DatasetNotPreparedError (a FileNotFoundError) whose message names the data set, the
  data_dir searched and the command that prepares it. Text data sets (a TextSpec in DATASETS)
  come wrapped in a `TextSource`, which also knows where their vocabulary is cached, or, with
  `tokenizer` (a Hugging Face tokenizer.json / vocab.txt), which WordPiece tokenizer to use.
  """
  if isinstance(registry.lookup_spec(name), TextSpec):
    return text.load(name, split, data_dir, tokenizer)
  if tokenizer:
    raise ValueError(f"a tokenizer is for text data sets; {name} is not one (unset "
                     "config.tokenizer)")
  return builders.load_source(name, split, data_dir)


def _text_call(source, dataset, mean, std, image_key, label_key, vocab_size) -> dict | None:
  """The text pipeline's extra arguments when `dataset` / `source` is a text data set, else None
  (and vocab_size must be None)."""
  if dataset is None and isinstance(source, text.TextSource):
    dataset = source.name
  name, spec = registry.spec_for(source, dataset)
  if not isinstance(spec, TextSpec):
    if vocab_size is not None:
      raise ValueError(f"vocab_size is for text data sets; {name or 'this data set'} is not one")
    return None
  if mean is not None or std is not None or image_key != "image":
    raise ValueError("mean=, std= and image_key= are for image data sets; "
                     f"{name or 'this data set'} is a text data set")
  return {"dataset": name if name is not None else spec, "vocab_size": vocab_size,
          "label_key": None if label_key == "label" else label_key}


def make_train_iterator(source, *, batch_size: int, seed: int, resolution: int | None = None,
                        augment: str = "none", dataset: str | DataSpec | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        start_step: int = 0, mean=None, std=None, in_memory: bool | None = None,
                        num_threads: int | None = None, image_key: str = "image",
                        label_key: str = "label", vocab_size: int | None = None) -> Batches:
  """Endless training batches {"inputs": float32 [b, R, R, C], "label": int32 [b]}, b = B / P.

  source: anything with len() and [i] -> {"image": uint8 HWC, "label": int} (e.g. `load(...)`;
  image_key / label_key name the record fields). batch_size is global (B); each step consumes B
  examples (remainder of an epoch dropped). Epoch e uses `np.random.default_rng([seed, e])
  .permutation(len(source))`; process p takes the contiguous slice [p * b, (p + 1) * b) of each
  global batch. augment is one of AUGMENTATIONS (randomness from default_rng([seed, 1, step,
  position in the global batch])). resolution: output size (default: the data set's). dataset
  names the DATASETS entry (mean / std, default resolution); by default it is read from
  `source.dataset_info.name`. start_step resumes: the batches equal those of an uninterrupted run
  from that step on.

  Reading: splits of <= IN_MEMORY_MAX_EXAMPLES examples are read into memory once and each batch
  is computed in the calling thread (num_threads=0); larger ones are read from the array_record
  files by a grain thread pool (num_threads default min(16, cpus)). Both give identical batches.

  Text data sets (a TextSpec) go to `text.make_train_iterator`: "inputs" holds int32 [b, T]
  token ids, T = resolution; vocab_size (text only; pass the model's) bounds the ids.
  """
  text_args = _text_call(source, dataset, mean, std, image_key, label_key, vocab_size)
  common = dict(batch_size=batch_size, seed=seed, resolution=resolution, augment=augment,
                process_index=process_index, process_count=process_count, start_step=start_step,
                in_memory=in_memory, num_threads=num_threads)
  if text_args is not None:
    return text.make_train_iterator(source, **common, **text_args)
  return images.make_train_iterator(source, **common, dataset=dataset, mean=mean, std=std,
                                    image_key=image_key, label_key=label_key)


def make_eval_iterator(source, *, batch_size: int, resolution: int | None = None,
                       dataset: str | DataSpec | None = None, process_index: int | None = None,
                       process_count: int | None = None, crop_fraction: float | None = -1.0,
                       mean=None, std=None, in_memory: bool | None = None,
                       num_threads: int | None = None, image_key: str = "image",
                       label_key: str = "label", vocab_size: int | None = None) -> Batches:
  """One ordered pass: ceil(n / B) batches {"inputs", "label", "mask": bool [b]} per process.

  Global batch i holds examples [i * B, (i + 1) * B); process p takes its contiguous slice of
  size b = B / P; positions past the end are padding (zero image, label 0, mask False), so
  every process yields the same number of batches and summing over mask counts each example
  exactly once. crop_fraction: central crop before the resize; the default (-1) means 0.875 for
  variable-size data sets (imagenet2012) and none for fixed-size ones. Text data sets go to
  `text.make_eval_iterator` (crop_fraction is ignored; vocab_size as for training).
  """
  text_args = _text_call(source, dataset, mean, std, image_key, label_key, vocab_size)
  common = dict(batch_size=batch_size, resolution=resolution, process_index=process_index,
                process_count=process_count, in_memory=in_memory, num_threads=num_threads)
  if text_args is not None:
    return text.make_eval_iterator(source, **common, **text_args)
  return images.make_eval_iterator(source, **common, dataset=dataset, crop_fraction=crop_fraction,
                                   mean=mean, std=std, image_key=image_key, label_key=label_key)


def eval_input(dataset: str, resolution: int) -> dict:
  """What evaluation on `dataset` at `resolution` feeds the model, as JSON (an export's
  summary.json "input"): `images.eval_input` for image data sets; for text ones only the
  sequence length (the ids depend on the run's vocabulary or tokenizer)."""
  if isinstance(registry.lookup_spec(dataset), TextSpec):
    return {"kind": "tokens", "dataset": dataset, "sequence_length": int(resolution)}
  return images.eval_input(dataset, resolution)
