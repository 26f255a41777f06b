"""Split arithmetic: which examples a TFDS split string reads, and whether two splits share any.

A search scores subnets on a validation split carved from the training data; if training saw
those images, every score is inflated and the ranking favours what the supernet memorised. So
``search.py`` resolves the training run's ``train_split`` and its own ``valid_split`` to example
ranges and refuses any overlap (:func:`check_disjoint`).

Split strings follow TFDS (``train``, ``train[:-500]``, ``train[-1000:]``, ``train[:90%]``,
``train[10:20]``, ``train+test``), parsed and rounded by TFDS itself
(``tfds.core.ReadInstruction``), so a range here is exactly what ``tfds.data_source`` reads.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, NamedTuple, Sequence, Union

import tensorflow_datasets as tfds

# {split name: number of examples}, or one count for every named split.
Sizes = Union[int, Mapping[str, int]]


class SplitRange(NamedTuple):
  """Examples ``[start, stop)`` of the base split ``name``."""
  name: str
  start: int
  stop: int

  def __str__(self) -> str:
    return f"{self.name}[{self.start}:{self.stop}]"

  def __len__(self) -> int:  # type: ignore[override]  (a NamedTuple's len is its arity)
    return max(0, self.stop - self.start)


@dataclasses.dataclass(frozen=True)
class _Info:
  """The two fields of ``tfds.core.SplitInfo`` that ``ReadInstruction.to_absolute`` reads."""
  num_examples: int
  shard_lengths: tuple = ()


def base_names(split: str) -> list[str]:
  """The base split names a split string reads: "train[:-500]+test" -> ["train", "test"]."""
  return [re.split(r"[\[(]", part.strip(), maxsplit=1)[0] for part in split.split("+")]


def resolve_split(split: str, num_examples: Sizes) -> list[SplitRange]:
  """The example ranges ``split`` reads (one per ``+`` part), by TFDS's own parsing and
  rounding. ``num_examples``: the size of every base split named, or one size for all."""
  names = base_names(split)
  sizes = num_examples if isinstance(num_examples, Mapping) else {n: num_examples for n in names}
  infos = {name: _Info(int(n)) for name, n in sizes.items()}
  try:
    absolute = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
  except (ValueError, AssertionError) as e:
    raise ValueError(f"split {split!r}: {e}") from e
  out = []
  for instr in absolute:
    n = infos[instr.splitname].num_examples
    start = 0 if instr.from_ is None else instr.from_
    stop = n if instr.to is None else instr.to
    out.append(SplitRange(instr.splitname, start, max(start, stop)))
  return out


def overlap(a: str, b: str, num_examples: Sizes) -> list[SplitRange]:
  """The example ranges both split strings read; different base splits never share any."""
  shared = []
  for x in resolve_split(a, num_examples):
    for y in resolve_split(b, num_examples):
      if x.name == y.name and max(x.start, y.start) < min(x.stop, y.stop):
        shared.append(SplitRange(x.name, max(x.start, y.start), min(x.stop, y.stop)))
  return shared


def holdout_split(train_split: str, holdout: int) -> str:
  """The last ``holdout`` examples of ``train_split``'s base split: what a run that trained on
  ``<base>[:-holdout]`` never saw."""
  return f"{base_names(train_split)[0]}[-{int(holdout)}:]"


def check_disjoint(train_split: str, valid_split: str, num_examples: Sizes) -> None:
  """Raises a ValueError naming both splits, the shared examples and a split that would be
  right when ``valid_split`` reads any example ``train_split`` does."""
  shared = overlap(train_split, valid_split, num_examples)
  if not shared:
    return
  valid = resolve_split(valid_split, num_examples)
  raise ValueError(
      f"valid_split {valid_split!r} ({', '.join(map(str, valid))}) overlaps the training run's "
      f"train_split {train_split!r} in {sum(len(r) for r in shared):,} examples "
      f"({', '.join(map(str, shared))}): the supernet trained on them, so they would overstate "
      f"every subnet's accuracy. {_advice(train_split, valid, num_examples)}")


def check_holdout(train_split: str, holdout: int, num_examples: Sizes) -> None:
  """Raises a ValueError when ``train_split`` reads any of the last ``holdout`` examples of its
  base split, which ``config.holdout`` keeps for search's validation."""
  if holdout > 0 and overlap(train_split, holdout_split(train_split, holdout), num_examples):
    base = base_names(train_split)[0]
    raise ValueError(
        f"config.holdout={holdout} keeps the last {holdout} examples of {base!r} for search's "
        f"validation, but config.train_split {train_split!r} reads them: train on "
        f"'{base}[:-{holdout}]', or set config.holdout=0 to hold nothing out")


def unseen_tail(train_split: str, num_examples: Sizes, base: str | None = None) -> str | None:
  """The end of the base split ``base`` (default: ``train_split``'s first) after the last
  example ``train_split`` reads, e.g. "train[-500:]" for "train[:-500]"; None when training
  read up to its end."""
  trained = resolve_split(train_split, num_examples)
  base = trained[0].name if base is None else base
  tail = _size(num_examples, base) - max(r.stop for r in trained if r.name == base)
  return f"{base}[-{tail}:]" if tail > 0 else None


def _advice(train_split: str, valid: list[SplitRange], num_examples: Sizes) -> str:
  """What would be right: the tail of the base split that training never read, else a
  train / validation pair of the same validation size."""
  base = valid[0].name
  tail = unseen_tail(train_split, num_examples, base) if base in base_names(train_split) else None
  if tail is not None:
    return f"Validate on {tail}, which training never read"
  size = _size(num_examples, base)
  k = min(sum(len(r) for r in valid), size // 2) or 1  # the validation size asked for, if it fits
  return (f"Train on {base}[:-{k}] and validate on {base}[-{k}:] (training config: "
          f"train_split='{base}[:-{k}]', holdout={k}), or validate on another split")


def _size(num_examples: Sizes, name: str) -> int:
  return int(num_examples[name] if isinstance(num_examples, Mapping) else num_examples)


def split_sizes(dataset: str, split_strings: Sequence[str], data_dir=None) -> dict[str, int]:
  """{base split name: number of examples} of every split the strings read, from the prepared
  data set's metadata (builds mnist_5k / digits on first use, like :func:`ofajax.data.load`)."""
  from ofajax.data import builders  # pylint: disable=g-import-not-at-top  (reads data)

  out = {}
  for name in dict.fromkeys(n for s in split_strings for n in base_names(s)):
    source = builders.load_source(dataset, name, data_dir)
    try:
      out[name] = int(source.dataset_info.splits[name].num_examples)
    except KeyError:  # no split metadata (e.g. tfds's mocked data): count the records
      out[name] = len(source)
  return out
