"""Layer 1: the data set registry. What each data set is, where it lives, how to prepare it.

Declarations only (no reading): `DataSpec` / `TextSpec`, the `DATASETS` table, name lookups
(`spec_key`, `lookup_spec`, `text_spec`, `spec_for`), the data_dir (`default_data_dir`,
`resolve_data_dir`) and the messages of a data set that is not prepared
(`DatasetNotPreparedError`, `prepare_instructions`, `missing_message`). Imports nothing of the
package.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

AUGMENTATIONS = ("none", "mnist", "cifar", "imagenet")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the pipeline and the models need to know about an image data set.

  image_shape is the stored (H, W, C); None for H and W when images vary in size (imagenet2012).
  mean / std are per channel, for images scaled to [0, 1]. resolution is the default training
  resolution; augment the default training augmentation (one of AUGMENTATIONS). local: built
  offline from data shipped in a wheel (`ofajax.data.builders`), not by `tfds build`.
  """

  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str = "train"
  eval_split: str = "test"
  augment: str = "none"
  resolution: int | None = None
  local: bool = False

  @property
  def channels(self) -> int:
    return self.image_shape[-1]

  @property
  def fixed_size(self) -> bool:
    return self.image_shape[0] is not None and self.image_shape[1] is not None


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """What the text pipeline needs to know about a text classification data set.

  text_key / label_key: the record fields. train_split: the split the vocabulary is built from
  (and the default training split); eval_split: a split with labels (glue's test splits have
  label -1: their eval split is "validation"). max_length: the default sequence length T.
  vocab_size: the default vocabulary size, specials included. builder_module: a module to
  import so that TFDS knows the builder (glue lives in `tensorflow_datasets.text`, which TFDS
  does not import by itself).
  """

  num_classes: int
  text_key: str = "sentence"
  label_key: str = "label"
  train_split: str = "train"
  eval_split: str = "validation"
  max_length: int = 128
  vocab_size: int = 30522
  builder_module: str | None = None

  @property
  def resolution(self) -> int:
    """The default "resolution" of a text data set: its sequence length."""
    return self.max_length


# Full MNIST train-set statistics; mnist_5k's 4,000 train images give 0.1310 / 0.3080.
_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
DATASETS: dict[str, DataSpec | TextSpec] = {
    "mnist_5k": DataSpec(10, (28, 28, 1), _MNIST_MEAN, _MNIST_STD, augment="mnist", resolution=28,
                         local=True),
    "mnist": DataSpec(10, (28, 28, 1), _MNIST_MEAN, _MNIST_STD, augment="mnist", resolution=28),
    # digits: mean / std of the 1,437 train images after scaling 0..16 -> 0..255 -> [0, 1].
    "digits": DataSpec(10, (8, 8, 1), (0.3055,), (0.3759,), augment="none", resolution=8,
                       local=True),
    "cifar10": DataSpec(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                        augment="cifar", resolution=32),
    "cifar100": DataSpec(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                         augment="cifar", resolution=32),
    "imagenet2012": DataSpec(1000, (None, None, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                             eval_split="validation", augment="imagenet", resolution=224),
    # Text (ofajax.data.text). glue/sst2's test split is unlabelled (label -1): train on "train",
    # evaluate on "validation" (872 sentences), so a config's test_split is "validation".
    "glue/sst2": TextSpec(2, text_key="sentence", train_split="train", eval_split="validation",
                          max_length=64, builder_module="tensorflow_datasets.text.glue"),
    "imdb_reviews": TextSpec(2, text_key="text", train_split="train", eval_split="test",
                             max_length=256),
}


# ------------------------------------------------------------------------------------------------
# Lookups.


def spec_key(name: str) -> str | None:
  """The DATASETS key of a TFDS name: "glue/sst2", "glue/sst2:2.0.0" and "glue/sst2/2.0.0"
  -> "glue/sst2"; "cifar10:3.0.2" -> "cifar10"; "imdb_reviews/plain_text/1.0.0" ->
  "imdb_reviews" (a data set registered without its config). None if not registered."""
  name = name.split(":")[0]
  parts = name.split("/")
  if len(parts) > 1 and parts[-1][:1].isdigit():  # a version
    parts = parts[:-1]
  for k in range(len(parts), 0, -1):
    if "/".join(parts[:k]) in DATASETS:
      return "/".join(parts[:k])
  return None


def lookup_spec(name: str) -> DataSpec | TextSpec | None:
  """The DATASETS entry of a TFDS name (see `spec_key`), or None."""
  key = spec_key(name)
  return DATASETS[key] if key is not None else None


def text_spec(name: str) -> TextSpec:
  """The TextSpec of a registered text data set; ValueError naming the text data sets if not."""
  spec = lookup_spec(name)
  if not isinstance(spec, TextSpec):
    raise ValueError(f"{name!r} is not a registered text data set; text data sets: "
                     f"{sorted(k for k, v in DATASETS.items() if isinstance(v, TextSpec))}")
  return spec


def spec_for(source, dataset) -> tuple[str | None, DataSpec | TextSpec | None]:
  """(name, spec) of the data set of `source`: `dataset` (a spec or a name) when given, else the
  name in `source.dataset_info`. (None, None) when nothing names it."""
  if isinstance(dataset, (DataSpec, TextSpec)):
    return None, dataset
  name = dataset
  if name is None:
    info = getattr(source, "dataset_info", None)
    # full_name ("glue/sst2/2.0.0") keeps the config that name ("glue") drops.
    name = getattr(info, "full_name", None) or getattr(info, "name", None)
  if name is None:
    return None, None
  return name, lookup_spec(name)


def base_name(name: str) -> str:
  """The TFDS builder name of a data set name: "glue/sst2:2.0.0" -> "glue"."""
  return name.split(":")[0].split("/")[0]


def is_local(name: str) -> bool:
  """Whether `name` is built offline from a wheel (a DataSpec with local=True)."""
  spec = DATASETS.get(base_name(name))
  return isinstance(spec, DataSpec) and spec.local


def is_registered(name: str) -> bool:
  """Whether TFDS knows a builder named `name`."""
  try:
    tfds.builder_cls(name)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


# ------------------------------------------------------------------------------------------------
# Where data sets live, and what to say when one is missing.


def default_data_dir() -> str:
  """$OFAJAX_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
  return os.environ.get("OFAJAX_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def resolve_data_dir(data_dir) -> str:
  """data_dir as a string, default_data_dir() when None."""
  return os.fspath(data_dir) if data_dir is not None else default_data_dir()


class DatasetNotPreparedError(FileNotFoundError):
  """A data set is not prepared (in array_record format) in the data_dir searched."""


def prepare_instructions(name: str, data_dir=None) -> str:
  """How to prepare `name` once so that `load(name, ...)` finds it in data_dir."""
  base, data_dir = base_name(name), resolve_data_dir(data_dir)
  if is_local(base):
    return (f"It is built locally from a wheel: python -c \"import ofajax.data as d; "
            f"d.ensure_local_dataset('{base}', '{data_dir}')\"")
  build = f"tfds build {name} --data_dir {data_dir} --file_format array_record"
  tf_note = ("The `tfds` command and the {base} builder need TensorFlow (pip install tensorflow) "
             "on the machine that prepares the data; reading it for training does not.")
  if base == "imagenet2012":
    return (
        f"Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (https://image-net.org, "
        f"needs an account) into {os.path.join(data_dir, 'downloads', 'manual')}/, then run once:\n"
        f"  {build}\n" + tf_note.format(base=base))
  return (f"On a machine with internet access run once:\n  {build}\nthen copy "
          f"{os.path.join(data_dir, base)} here if you built it elsewhere. "
          + tf_note.format(base=base))


def missing_message(name: str, data_dir: str) -> str:
  """The message of the DatasetNotPreparedError for `name` not found in data_dir."""
  base = name.split(":")[0]  # with the config, if any: glue/sst2 lives in <data_dir>/glue/sst2
  found = sorted(
      v for v in (os.listdir(os.path.join(data_dir, base))
                  if os.path.isdir(os.path.join(data_dir, base)) else [])
      if os.path.exists(os.path.join(data_dir, base, v, "dataset_info.json")))
  if found:
    where = os.path.join(data_dir, base, found[-1])
    return (f"Data set {name!r} in {where} is not in array_record format (needed to read it "
            f"without TensorFlow). Rebuild it:\n  tfds build {name} --data_dir {data_dir} "
            f"--file_format array_record\nor convert it (needs TensorFlow):\n  tfds convert_format "
            f"--dataset_version_dir {where} --out_file_format array_record")
  head = (f"Data set {name!r} is not prepared in data_dir {data_dir} (searched "
          f"{os.path.join(data_dir, base)}; set OFAJAX_DATA_DIR or pass data_dir= to look "
          f"elsewhere).")
  if not is_registered(base_name(name)):
    return head + f" TFDS knows no builder named {base_name(name)!r} either; check the name."
  return head + "\n" + prepare_instructions(name, data_dir)
