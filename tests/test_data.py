"""Input pipeline: local TFDS builders, order, resume, sharding, eval padding, mocked sets."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ofajax import data
from ofajax.data import builders

SIZES = {"mnist_5k": (4000, 1000, (28, 28, 1)), "digits": (1437, 360, (8, 8, 1))}


def read_split(name, split, data_dir):
  src = data.load(name, split, data_dir)
  records = [src[i] for i in range(len(src))]
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in ("image", "label", "index")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  for name in data.LOCAL_DATASETS:
    data.ensure_local_dataset(name, d)
  return str(d)


@pytest.fixture(scope="module")
def splits(data_dir):
  return {(n, s): read_split(n, s, data_dir) for n in SIZES for s in ("train", "test")}


# A synthetic source whose images spell their own index, so batch order can be read back.
SPEC = data.DataSpec(10, (4, 4, 1), (0.0,), (1.0,), resolution=4)


def index_source(n):
  def ex(i):
    img = np.zeros((4, 4, 1), np.uint8)
    img[0, 0, 0], img[0, 1, 0] = divmod(i, 256)
    return {"image": img, "label": i % 10}
  return [ex(i) for i in range(n)]


def indices_of(batch):
  x = np.round(batch["inputs"][:, 0, :2, 0] * 255).astype(int)
  return x[:, 0] * 256 + x[:, 1]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Local builders.


@pytest.mark.parametrize("name", list(SIZES))
def test_local_dataset_splits(name, splits):
  n_train, n_test, shape = SIZES[name]
  train, test = splits[(name, "train")], splits[(name, "test")]
  assert len(train["label"]) == n_train and len(test["label"]) == n_test
  for s in (train, test):
    assert s["image"].dtype == np.uint8 and s["image"].shape[1:] == shape
    assert set(np.unique(s["label"])) == set(range(10))  # every class, nothing else
  # Disjoint, together the whole file, and exactly the documented fixed permutation.
  perm = np.random.default_rng(data.SPLIT_SEED).permutation(n_train + n_test)
  np.testing.assert_array_equal(np.sort(train["index"]), np.sort(perm[:n_train]))
  np.testing.assert_array_equal(np.sort(test["index"]), np.sort(perm[n_train:]))
  # Pixels and labels survive the PNG round trip exactly.
  images, labels = builders.mnist_5k_arrays() if name == "mnist_5k" else builders.digits_arrays()
  np.testing.assert_array_equal(test["image"], images[test["index"]])
  np.testing.assert_array_equal(test["label"], labels[test["index"]])
  assert images.max() == 255


def test_registry_marks_the_local_builders():
  assert {k for k, s in data.DATASETS.items() if getattr(s, "local", False)} == set(
      data.LOCAL_DATASETS)
  assert set(data.BATCH_FIELDS) == {data.INPUTS, data.LABEL, data.MASK} == {"inputs", "label",
                                                                            "mask"}


def test_local_build_is_deterministic_and_built_once(tmp_path, data_dir, splits):
  for name in SIZES:
    prepared = data.ensure_local_dataset(name, tmp_path)
    for split in ("train", "test"):
      again = read_split(name, split, tmp_path)
      for k in ("image", "label", "index"):  # same content in the same stored order
        np.testing.assert_array_equal(again[k], splits[(name, split)][k])
    files = {f: os.path.getmtime(os.path.join(prepared, f)) for f in os.listdir(prepared)}
    assert data.ensure_local_dataset(name, tmp_path) == prepared
    assert {f: os.path.getmtime(os.path.join(prepared, f)) for f in os.listdir(prepared)} == files


def test_split_strings(data_dir):
  head, tail = data.load("digits", "train[:90%]", data_dir), data.load("digits", "train[90%:]",
                                                                        data_dir)
  assert (len(head), len(tail)) == (1293, 144)
  assert int(tail[0]["index"]) == int(data.load("digits", "train", data_dir)[1293]["index"])


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("OFAJAX_DATA_DIR", str(tmp_path))
  assert data.default_data_dir() == str(tmp_path)
  monkeypatch.delenv("OFAJAX_DATA_DIR")
  assert data.default_data_dir() == os.path.expanduser("~/tensorflow_datasets")


def test_missing_dataset_message(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.load("cifar10", "train[:90%]", tmp_path)
  msg = str(e.value)
  for part in ("cifar10", str(tmp_path),
               f"tfds build cifar10 --data_dir {tmp_path} --file_format array_record",
               "TensorFlow"):
    assert part in msg
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.load("imagenet2012", "validation", tmp_path)
  msg = str(e.value)
  for part in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
               os.path.join(str(tmp_path), "downloads", "manual"),
               f"tfds build imagenet2012 --data_dir {tmp_path} --file_format array_record"):
    assert part in msg
  with pytest.raises(FileNotFoundError, match="no builder named 'no_such_set'"):
    data.load("no_such_set", "train", tmp_path)


# ---------------------------------------------------------------------------------------------
# Order, resume, sharding.


def test_order_is_the_documented_permutation():
  n, batch = 103, 20  # 5 steps per epoch, 3 examples dropped each epoch
  src = index_source(n)
  it = data.make_train_iterator(src, batch_size=batch, seed=7, dataset=SPEC, process_index=0,
                                process_count=1)
  assert it.steps_per_epoch == 5
  got = np.stack([indices_of(next(it)) for _ in range(10)]).reshape(2, 100)
  for epoch in range(2):
    np.testing.assert_array_equal(got[epoch],
                                  np.random.default_rng([7, epoch]).permutation(n)[:100])
  assert not np.array_equal(got[0], got[1])  # a new order every epoch
  assert len(set(got[0])) == 100  # no repeats within an epoch
  other = data.make_train_iterator(src, batch_size=batch, seed=8, dataset=SPEC, process_index=0,
                                   process_count=1)
  assert not np.array_equal(indices_of(next(other)), got[0, :20])
  assert it.step == 10 and it.state() == {"step": 10}


def test_resume_reproduces_batches(data_dir):
  src = data.load("digits", "train", data_dir)  # 1437 examples: 11 steps per epoch at 128
  kw = dict(batch_size=128, seed=3, augment="mnist", resolution=12, process_index=0,
            process_count=1)
  it = data.make_train_iterator(src, **kw)
  run = [next(it) for _ in range(13)]  # crosses the epoch boundary at step 11
  assert run[0]["inputs"].shape == (128, 12, 12, 1) and run[0]["inputs"].dtype == np.float32
  assert run[0]["label"].dtype == np.int32
  resumed = data.make_train_iterator(src, start_step=9, **kw)
  for step in range(9, 13):
    assert_batches_equal(next(resumed), run[step])
  it.restore({"step": 10})
  assert_batches_equal(next(it), run[10])
  # Augmentation is random but deterministic: the same example order without it differs.
  plain = data.make_train_iterator(src, **{**kw, "augment": "none"})
  b = next(plain)
  np.testing.assert_array_equal(b["label"], run[0]["label"])
  assert not np.allclose(b["inputs"], run[0]["inputs"])


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_partition_global_batch(count, data_dir):
  src = data.load("digits", "test", data_dir)
  kw = dict(batch_size=64, seed=5, augment="mnist", resolution=8, start_step=4)
  full = data.make_train_iterator(src, process_index=0, process_count=1, **kw)
  parts = [data.make_train_iterator(src, process_index=p, process_count=count, **kw)
           for p in range(count)]
  for _ in range(2):
    whole, pieces = next(full), [next(it) for it in parts]
    assert all(len(p["label"]) == 64 // count for p in pieces)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in pieces]), whole[k])
  with pytest.raises(ValueError, match="split evenly"):
    data.make_train_iterator(src, process_index=0, process_count=3, **kw)


def test_grain_path_equals_in_memory_path(data_dir):
  src = data.load("digits", "train", data_dir)
  kw = dict(batch_size=32, seed=2, augment="mnist", resolution=16, process_index=1,
            process_count=2, start_step=44)  # 44 steps per epoch: crosses into epoch 1
  mem = data.make_train_iterator(src, **kw)
  thr = data.make_train_iterator(src, in_memory=False, num_threads=2, **kw)
  assert mem.in_memory and not thr.in_memory and thr.num_threads == 2
  for _ in range(3):
    assert_batches_equal(next(thr), next(mem))
  thr.step = 44  # repositioning restarts the grain pipeline at that step
  mem.restore({"step": 44})
  assert_batches_equal(next(thr), next(mem))


def test_eval_covers_every_example_once():
  n, batch, count = 103, 20, 2
  seen = []
  for p in range(count):
    it = data.make_eval_iterator(index_source(n), batch_size=batch, dataset=SPEC,
                                 process_index=p, process_count=count)
    batches = list(it)
    assert len(it) == len(batches) == 6  # ceil(103 / 20), the same on every process
    for i, b in enumerate(batches):
      assert b["mask"].dtype == bool and b["inputs"].shape == (10, 4, 4, 1)
      idx = indices_of(b)
      np.testing.assert_array_equal(b["mask"], i * batch + p * 10 + np.arange(10) < n)
      np.testing.assert_array_equal(idx[b["mask"]], i * batch + p * 10 + np.arange(10)[b["mask"]])
      assert not b["inputs"][~b["mask"]].any()
      seen.extend(idx[b["mask"]])
  assert sorted(seen) == list(range(n))


def test_eval_on_real_data_normalised(data_dir, splits):
  it = data.make_eval_iterator(data.load("mnist_5k", "test", data_dir), batch_size=512,
                               process_index=0, process_count=1)
  batches = list(it)
  x = np.concatenate([b["inputs"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                splits[("mnist_5k", "test")]["label"])
  spec = data.DATASETS["mnist_5k"]
  np.testing.assert_allclose(x * spec.std[0] + spec.mean[0],
                             splits[("mnist_5k", "test")]["image"] / 255.0, atol=1e-6)
  assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


# ---------------------------------------------------------------------------------------------
# Real data sets, mocked (tfds.testing.mock_data patches tfds.data_source too; no TensorFlow).


@pytest.mark.parametrize("name,augment,resolution", [("cifar10", "cifar", 32),
                                                      ("imagenet2012", "imagenet", 64)])
def test_mocked_real_dataset_pipeline(name, augment, resolution):
  spec = data.DATASETS[name]
  with tfds.testing.mock_data(num_examples=24):
    src = data.load(name, "train")
    if name == "imagenet2012":  # mocked images come in random sizes, as the real ones do
      assert len({np.asarray(src[i]["image"]).shape for i in range(4)}) > 1
    kw = dict(batch_size=16, seed=0, resolution=resolution, process_index=0, process_count=1)
    it = data.make_train_iterator(src, augment=augment, **kw)
    b = next(it)
    assert b["inputs"].shape == (16, resolution, resolution, 3) and b["inputs"].dtype == np.float32
    assert b["label"].dtype == np.int32 and 0 <= b["label"].min()
    assert b["label"].max() < spec.num_classes
    assert np.isfinite(b["inputs"]).all()
    threaded = data.make_train_iterator(src, augment=augment, in_memory=False, num_threads=2,
                                        **kw)
    assert_batches_equal(next(threaded), b)
    plain = next(data.make_train_iterator(src, augment="none", **kw))
    np.testing.assert_array_equal(plain["label"], b["label"])  # same order, other pixels
    assert not np.allclose(plain["inputs"], b["inputs"])
    ev = list(data.make_eval_iterator(data.load(name, spec.eval_split), batch_size=10,
                                      resolution=resolution, process_index=0, process_count=1))
    assert [int(e["mask"].sum()) for e in ev] == [10, 10, 4]
    assert ev[0]["inputs"].shape == (10, resolution, resolution, 3)


# ---------------------------------------------------------------------------------------------
# Transforms.


@pytest.mark.parametrize("shape,size", [((37, 53, 3), (64, 64)), ((200, 150, 1), (64, 48)),
                                        ((8, 8, 1), (28, 28))])
def test_resize_matches_jax_image_resize(shape, size):
  x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
  want = jax.image.resize(jnp.asarray(x, jnp.float32), (*size, shape[2]), "linear",
                          antialias=True)
  np.testing.assert_allclose(data.resize(x, size), np.asarray(want), atol=1e-3)


def test_random_resized_crop():
  x = np.random.default_rng(0).integers(0, 256, (40, 60, 3)).astype(np.uint8)
  outs = [data.random_resized_crop(x, np.random.default_rng(s), 24) for s in range(8)]
  assert all(o.shape == (24, 24, 3) and o.dtype == np.float32 for o in outs)
  assert len({o.tobytes() for o in outs}) == 8  # different crops
  np.testing.assert_array_equal(data.random_resized_crop(x, np.random.default_rng(3), 24), outs[3])
  square = x[:, :40]
  whole = data.random_resized_crop(square, np.random.default_rng(0), 24, scale=(1, 1),
                                   ratio=(1, 1))
  np.testing.assert_allclose(whole, data.resize(square, 24))
  # Impossible constraints fall back to the central crop with the closest aspect ratio.
  tall = np.random.default_rng(1).integers(0, 256, (90, 30, 1)).astype(np.uint8)
  fallback = data.random_resized_crop(tall, np.random.default_rng(0), 16, scale=(2, 2))
  np.testing.assert_allclose(fallback, data.resize(tall[25:65], 16))


def test_pad_crop_and_flip():
  x = np.arange(1, 17, dtype=np.uint8).reshape(4, 4, 1)
  shifts = set()
  for s in range(40):
    y = data.pad_random_crop(x, np.random.default_rng(s), 2)
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    hits = [(t, l) for t in range(5) for l in range(5)
            if np.array_equal(padded[t:t + 4, l:l + 4], y)]
    assert len(hits) == 1
    shifts.add(hits[0])
  assert len(shifts) > 10
  flips = [data.random_flip(x, np.random.default_rng(s)) for s in range(40)]
  assert all(np.array_equal(f, x) or np.array_equal(f, x[:, ::-1]) for f in flips)
  assert 5 < sum(np.array_equal(f, x[:, ::-1]) for f in flips) < 35
  np.testing.assert_array_equal(data.center_crop(np.zeros((10, 20, 3)), 0.8).shape, (8, 8, 3))
  with pytest.raises(ValueError, match="augment"):
    data.transform(x, None, augment="autoaugment", resolution=4)
