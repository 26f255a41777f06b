"""GAN compression's parts: generators (pruned widths, elasticize), the edge -> digit pairs and
their batches, and the judge's metrics. Tiny sizes: the file runs in well under a minute."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import serialization

import ofajax
from ofajax import data
from ofajax.gan import data as gan_data
from ofajax.gan import judge as gan_judge
from ofajax.models import FAST_COMPILE
from conftest import TEST_JUDGE
from ofajax.models import generators as gen

X = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1)), jnp.float32)
GENERATORS = (gen.ResnetGenerator, gen.MobileResnetGenerator)


def shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def abstract_variables(module):
  return jax.eval_shape(module.init, jax.random.key(0), X)


def init_shapes(module):
  return shapes(abstract_variables(module))


# ---------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("cls", GENERATORS)
def test_generator_maps_images_to_images_in_tanh_range(cls):
  module = cls(ngf=4, n_blocks=1, out_channels=3)

  def both_modes(key, x):
    variables = module.init(key, x)
    return variables, module.apply(variables, x), module.apply(variables, x, train=True,
                                                               mutable=["batch_stats"])

  # One program, compiled for speed of compilation (it runs once).
  key = jax.random.key(0)
  variables, y, (y_train, updates) = jax.jit(both_modes).lower(key, X).compile(
      compiler_options=FAST_COMPILE)(key, X)
  assert y.shape == y_train.shape == (2, 28, 28, 3)
  assert float(jnp.max(jnp.abs(y))) < 1.0 and float(jnp.std(y)) > 0.0
  # Training mode normalises with batch statistics and moves the running ones.
  assert not np.allclose(y, y_train)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                       updates["batch_stats"])
  assert all(jax.tree.leaves(moved))


def test_patch_discriminator_gives_patch_logits():
  disc = gen.PatchDiscriminator(ndf=4, n_layers=2)
  variables = jax.eval_shape(disc.init, jax.random.key(0), X, X)
  assert "batch_stats" not in variables
  assert jax.eval_shape(disc.apply, variables, X, -X).shape == (2, 7, 7, 1)


def test_widths_override_named_convs():
  widths = (("stem", 3), ("block1/pw1", 5), ("up1", 6))
  params = init_shapes(gen.MobileResnetGenerator(ngf=4, n_blocks=2, widths=widths))["params"]
  assert params["stem"]["kernel"] == (7, 7, 1, 3)
  assert params["down1"]["kernel"] == (3, 3, 3, 8)
  assert params["block1"]["pw1"]["kernel"] == (1, 1, 16, 5)
  assert params["block1"]["dw2"]["kernel"] == (3, 3, 1, 5)   # depthwise follows pw1
  assert params["block1"]["pw2"]["kernel"] == (1, 1, 5, 16)
  assert params["block0"]["pw1"]["kernel"] == (1, 1, 16, 16)
  assert params["up1"]["kernel"] == (3, 3, 16, 6)
  assert params["up2"]["kernel"] == (3, 3, 6, 4)


@pytest.mark.parametrize("widths, message", [
    ((("block9/pw1", 4),), "name no conv"),
    ((("block0/pw2", 8),), "residual add"),
    ((("block0/dw2", 8),), "depthwise input"),
    ((("head", 3),), "out_channels"),
    ((("up2", 0),), "at least one channel")])
def test_inconsistent_widths_are_refused(widths, message):
  with pytest.raises(ValueError, match=message):
    gen.MobileResnetGenerator(ngf=4, n_blocks=2, widths=widths).layer_widths()


@pytest.mark.parametrize("cls, pruned", [
    (gen.ResnetGenerator, (("down2", 12), ("block0/conv1", 5), ("block1/conv2", 12),
                           ("up2", 3))),
    (gen.MobileResnetGenerator, (("down1", 6), ("down2", 12), ("block0/pw1", 7),
                                 ("block1/pw1", 2), ("block0/pw2", 12)))])
def test_widths_from_params_rebuilds_a_pruned_generator(cls, pruned):
  params = abstract_variables(cls(ngf=4, n_blocks=2, widths=pruned))["params"]
  widths = gen.widths_from_params(params)
  params = shapes(params)
  assert dict(widths)["down2"] == 12 and hash(widths) is not None
  assert init_shapes(cls(ngf=4, n_blocks=2, widths=widths))["params"] == params
  assert init_shapes(cls(ngf=4, n_blocks=2))["params"] != params


def test_factories_load_weights_and_their_widths(tmp_path):
  module, sample = gen.mobile_resnet_generator(ngf=4, n_blocks=2)
  assert isinstance(module, gen.MobileResnetGenerator) and sample.shape == (1, 28, 28, 1)
  pruned = gen.MobileResnetGenerator(ngf=4, n_blocks=2, widths=(("block0/pw1", 3),))
  key = jax.random.key(1)
  variables = jax.jit(pruned.init).lower(key, X).compile(compiler_options=FAST_COMPILE)(key, X)
  path = str(tmp_path / "g.msgpack")
  with open(path, "wb") as f:
    f.write(serialization.to_bytes(variables))
  module, _, loaded = gen.mobile_resnet_generator(ngf=4, n_blocks=2, weights=path)
  assert module.layer_widths() == pruned.layer_widths()   # so the same function of them
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  # Variables saved from an elasticized supernet wrap the module's under "net".
  with open(path, "wb") as f:
    f.write(serialization.to_bytes({k: {"net": v} for k, v in variables.items()}))
  module, _, loaded = gen.mobile_resnet_generator(ngf=4, n_blocks=2, weights=path)
  assert module.layer_widths() == pruned.layer_widths()
  assert shapes(loaded) == shapes(variables)
  # Widths as a config's JSON gives them back (lists), still a hashable module.
  module, _ = gen.resnet_generator(ngf=4, n_blocks=1, widths=[["up2", 2]])
  assert hash(module) is not None and module.layer_widths()["up2"] == 2
  with pytest.raises(FileNotFoundError, match="missing.msgpack"):
    gen.resnet_generator(weights=str(tmp_path / "missing.msgpack"))


def test_elasticize_follows_the_mobile_generator():
  module = gen.MobileResnetGenerator(ngf=8, n_blocks=2)
  x = jnp.zeros((1, 28, 28, 1))
  supernet, space, variables = ofajax.elasticize(module, x)
  text = ofajax.elastic.describe(supernet)
  print(text)
  lines = text.splitlines()

  def line_of(layers):
    return next(line for line in lines if line.endswith(layers))

  for layers in ("stem", "down1", "down2, block0/pw2, block1/pw2", "block0/pw1", "block1/pw1",
                 "up1", "up2"):
    assert "width[" in line_of(layers), layers
  assert "fixed: the model's output" in line_of("head")
  images = X[:1]
  largest = supernet.apply(variables, images, space.largest())
  smallest = supernet.apply(variables, images, space.smallest())
  plain = {k: v["net"] for k, v in variables.items() if k in ("params", "batch_stats")}
  np.testing.assert_allclose(largest, module.apply(plain, images), atol=1e-5)
  assert largest.shape == smallest.shape == (1, 28, 28, 1)
  assert not np.allclose(largest, smallest)


# ---------------------------------------------------------------------------------- pairs


def test_edge_map_outlines_a_square():
  image = np.zeros((1, 28, 28, 1), np.uint8)
  image[0, 8:20, 8:20] = 255
  edges = gan_data.edge_map(image)[0, ..., 0] > 0
  assert edges.dtype == bool and edges[8, 14] and edges[7, 14] and edges[14, 19]
  assert not edges[14, 14] and not edges[2, 2]   # not the flat inside, not the background
  assert gan_data.edge_map(np.zeros_like(image)).max() == -1.0


def test_pairs_line_up_and_edges_are_clean_outlines(mnist_dir):
  pairs = gan_data.load_pairs("train[-500:]", mnist_dir)
  source = data.load("mnist_5k", "train[-500:]", mnist_dir)
  assert len(pairs) == len(source) == 500
  for i in (0, 123, 499):
    record = source[i]
    assert pairs.labels[i] == record["label"]
    np.testing.assert_allclose(pairs.digits[i], record["image"] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(pairs.edges[i], gan_data.edge_map(record["image"][None])[0])
  assert set(np.unique(pairs.edges)) == {-1.0, 1.0} and pairs.edges.dtype == np.float32
  fraction = (pairs.edges > 0).mean(axis=(1, 2, 3))
  assert fraction.min() > 0.03 and 0.1 < fraction.mean() < 0.3
  # Every edge pixel touches ink (Sobel reads the 3x3 neighbourhood).
  ink = np.pad(pairs.digits[..., 0] > -1, ((0, 0), (1, 1), (1, 1)))
  near_ink = np.zeros_like(pairs.edges[..., 0], bool)
  for dy in range(3):
    for dx in range(3):
      near_ink |= ink[:, dy:dy + 28, dx:dx + 28]
  assert not np.any((pairs.edges[..., 0] > 0) & ~near_ink)


def test_train_batches_are_deterministic_and_resume_exactly():
  n = 10
  pairs = gan_data.PairedSet(np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1),
                             np.zeros((n, 1, 1, 1), np.float32), np.arange(n, dtype=np.int32))

  def take(seed, start, count):
    it = gan_data.train_batches(pairs, 3, seed, start_step=start)
    return [next(it)["labels"].tolist() for _ in range(count)]

  run = take(7, 0, 12)
  assert run == take(7, 0, 12) and run != take(8, 0, 12)
  for start in (1, 3, 4, 8):
    assert take(7, start, 12 - start) == run[start:]
  for epoch in range(4):   # 3 whole batches of distinct rows per epoch; a fresh order each
    rows = sum(run[3 * epoch:3 * epoch + 3], [])
    assert len(set(rows)) == 9
  assert run[0:3] != run[3:6]


# ---------------------------------------------------------------------------------- metrics


def exact_gaussian(rng, n, mean, cov_root):
  """n samples whose sample mean and covariance are exactly `mean` and cov_root cov_root^T."""
  z = rng.standard_normal((n, len(mean)))
  z -= z.mean(0)
  z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
  return z @ cov_root.T + mean


def test_frechet_distance_identities():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
  assert gan_judge.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
  assert gan_judge.frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-8)
  # Diagonal covariances: sum (mu_a - mu_b)^2 + sum (s_a - s_b)^2.
  mu_a, mu_b = rng.standard_normal(5), rng.standard_normal(5)
  s_a, s_b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
  x = exact_gaussian(rng, 300, mu_a, np.diag(s_a))
  y = exact_gaussian(rng, 500, mu_b, np.diag(s_b))
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((s_a - s_b) ** 2)
  assert gan_judge.frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)
  # Full covariances: the textbook formula with a general matrix square root.
  b = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 1.0
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  reference = (np.sum((a.mean(0) - b.mean(0)) ** 2)
               + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real))
  assert gan_judge.frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
  assert gan_judge.frechet_distance(b, a) == pytest.approx(reference, rel=1e-6)
  with pytest.raises(ValueError):
    gan_judge.frechet_distance(a, b[:, :5])


# A shortened judge: the same network and recipe, fewer epochs (the default takes longer).
SMALL = gan_judge.settings_with(TEST_JUDGE)


@pytest.fixture(scope="module")
def judge(mnist_dir):
  return gan_judge.get_judge(mnist_dir, SMALL)


def test_judge_trains_once_and_is_cached(mnist_dir, judge):
  path = gan_judge.cache_path(mnist_dir, SMALL)
  assert os.path.exists(path) and path != gan_judge.cache_path(mnist_dir)
  assert judge.info["test_accuracy"] > 90 and judge.info["settings"] == SMALL
  started = time.perf_counter()
  again = gan_judge.get_judge(mnist_dir, SMALL)
  assert time.perf_counter() - started < 5   # loaded, not trained
  assert again.info == judge.info
  jax.tree.map(np.testing.assert_array_equal, again.params, judge.params)


def test_judge_tells_digits_from_noise(mnist_dir, judge):
  test = gan_data.load_pairs("test", mnist_dir)
  noise = np.random.default_rng(0).uniform(-1, 1, test.digits.shape).astype(np.float32)
  assert 100 * np.mean(judge.predict(test.digits) == test.labels) > 90
  assert 100 * np.mean(judge.predict(noise) == test.labels) < 30
  real = judge.features(test.digits)
  assert real.shape == (1000, SMALL["features"])
  np.testing.assert_allclose(judge.features(test.digits[:3]), real[:3], rtol=1e-5, atol=1e-6)
  between_halves = gan_judge.frechet_distance(real[:500], real[500:])
  assert between_halves < 0.05 * gan_judge.frechet_distance(real, judge.features(noise))


def test_score_generator(mnist_dir, judge):
  test = gan_data.load_pairs("test", mnist_dir)
  # A "generator" that returns the real digit for each condition: the best possible scores.
  copying = gan_data.PairedSet(test.digits, test.digits, test.labels)
  calls = []

  def perfect(batch):
    calls.append(batch.shape)
    return batch

  best = gan_judge.score_generator(perfect, copying, judge, batch_size=300)
  assert set(calls) == {(300, 28, 28, 1)}   # 1,000 rows in 4 equal batches, the last padded
  assert best["frechet"] == pytest.approx(0.0, abs=1e-6)
  assert best["accuracy"] == pytest.approx(100 * np.mean(judge.predict(test.digits)
                                                         == test.labels))
  blank = gan_judge.score_generator(lambda e: jnp.full_like(e, -1.0), test, judge)
  assert blank["frechet"] > 100 * max(best["frechet"], 1e-3) and blank["accuracy"] < 30
