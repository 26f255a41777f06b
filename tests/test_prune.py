"""ofajax.prune: one-shot L1 / BN-scale channel pruning of a supernet to a smaller dense model.

The pruned model is the masked supernet at the pruned arch on sorted weights, its cost is the
plain module's at the pruned widths, the kept channels are the ones the criterion ranks first,
its saved variables load into the plain module built at those widths, bad input is named, and a
trained workdir is pruned by the library and by ``python prune.py``.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import ofajax
from ofajax import prune as prune_lib
from ofajax.elastic import sorting
from ofajax.models import FAST_COMPILE
from ofajax.workdir import Checkpoints, new_state, write_config
from user_models import MLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (2, 8, 8, 3)
FULL = (6, 8)   # (stem and residual width, the block's middle width)


class Block(nn.Module):
  mid: int
  out: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(nn.BatchNorm(not train, name="bn1")(nn.Conv(self.mid, (3, 3), name="conv1")(x)))
    y = nn.BatchNorm(not train, name="bn2")(nn.Conv(self.out, (3, 3), name="conv2")(y))
    return nn.relu(x + y)


class WideCNN(nn.Module):
  """A plain CNN whose widths can be set: a 5x5 stem (an elastic kernel), a skippable residual
  block, a dense head."""
  widths: tuple[int, int] = FULL

  @nn.compact
  def __call__(self, x, train: bool = False):
    stem, mid = self.widths
    x = nn.relu(nn.BatchNorm(not train, name="stem_bn")(nn.Conv(stem, (5, 5), name="stem")(x)))
    x = Block(mid, stem, name="block")(x, train)
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def _weights(seed: int = 0, scale=None) -> dict:
  """Seeded random variables of WideCNN; ``scale`` maps a conv's name to per-filter L1 norms
  (or a BatchNorm's name to its gamma) so the importance of every channel is known."""
  module = WideCNN()
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(SHAPE))
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (rng.standard_normal(leaf.shape) * 0.3).astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(one, abstract)
  params = variables["params"]
  for name, values in (scale or {}).items():
    node = params["block"][name] if name in ("conv1", "conv2", "bn1", "bn2") else params[name]
    if "kernel" in node:   # each output filter's L1 norm becomes values[j]
      kernel = node["kernel"]
      node["kernel"] = kernel / np.abs(kernel).sum(axis=(0, 1, 2)) * np.asarray(values)
    else:
      node["scale"] = np.asarray(values, np.float32) * rng.choice([-1, 1], len(values))
  return variables


def _elasticize(variables):
  x = jnp.asarray(np.random.default_rng(1).standard_normal(SHAPE), jnp.float32)
  supernet, space, wrapped = ofajax.elasticize(WideCNN(), x, variables, skippable=("block",))
  return x, supernet, space, wrapped


def _ranks(rng, n):
  """n positive importances, distinct (and so are sums of two such draws)."""
  return rng.uniform(1.0, 2.0, n).astype(np.float32)


def _run(fn, *args):
  """``fn(*args)`` jitted with FAST_COMPILE: one compile costs less than op-by-op dispatch."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _user(pruned):
  return pruned.user_variables["params"]


def _arch(pruned):
  return {k: jnp.asarray(v, jnp.int32) for k, v in pruned.arch.items()}


@pytest.mark.parametrize("criterion", ["l1", "bn_scale"])
def test_pruned_model_is_the_supernet_at_the_pruned_arch(criterion):
  x, supernet, space, variables = _elasticize(_weights())
  pruned = prune_lib.prune(supernet, variables, space, keep=0.5, criterion=criterion)
  ranked = sorting.sort_channels(supernet, variables, rank_by=prune_lib.CRITERIA[criterion])
  masked = _run(supernet.apply, ranked, x, _arch(pruned))
  dense = _run(pruned.dense_model.apply, pruned.dense_variables, x)
  np.testing.assert_allclose(dense, masked, atol=1e-5, rtol=1e-5)
  # Pruning changed the function (a trivially equal pair would pass the check above too).
  assert np.abs(dense - _run(supernet.apply, variables, x, space.largest())).max() > 1e-3
  assert _user(pruned)["stem"]["kernel"].shape == (5, 5, 3, 3)   # full kernel, 3 filters
  assert "block" in _user(pruned)                                 # the skippable block kept


def _macs(stem, mid, positions=64):
  """WideCNN's MACs: three convs at 8x8 (SAME, stride 1), then the head."""
  return positions * (25 * 3 * stem + 9 * stem * mid + 9 * mid * stem) + stem * 10


def _count(variables):
  return sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))


def test_l1_keeps_the_largest_filters_and_cost_drops():
  rng = np.random.default_rng(2)
  a, b, c = _ranks(rng, 6), _ranks(rng, 6), _ranks(rng, 8)
  user = _weights(scale={"stem": a, "conv2": b, "conv1": c})
  x, supernet, space, variables = _elasticize(user)
  pruned = prune_lib.prune(supernet, variables, space, keep=0.5)
  # The residual add ties the stem and conv2 filters: their L1 norms add up (Li et al.).
  top, top_mid = np.argsort(-(a + b))[:3], np.argsort(-c)[:4]
  got, params = _user(pruned), user["params"]
  np.testing.assert_array_equal(got["stem"]["kernel"], params["stem"]["kernel"][..., top])
  np.testing.assert_array_equal(got["block"]["conv1"]["kernel"],
                                params["block"]["conv1"]["kernel"][:, :, top][..., top_mid])
  np.testing.assert_array_equal(got["block"]["conv2"]["kernel"],
                                params["block"]["conv2"]["kernel"][:, :, top_mid][..., top])
  np.testing.assert_array_equal(got["head"]["kernel"], params["head"]["kernel"][top])
  np.testing.assert_array_equal(pruned.user_variables["batch_stats"]["stem_bn"]["mean"],
                                user["batch_stats"]["stem_bn"]["mean"][top])
  # Cost: the convs between two elastic groups shrink by keep^2, the stem and head by keep.
  assert (pruned.macs_before, pruned.macs_after) == (_macs(*FULL), _macs(3, 4))
  small = jax.eval_shape(WideCNN((3, 4)).init, jax.random.key(0), jnp.zeros(SHAPE))
  assert (pruned.params_before, pruned.params_after) == (_count(user), _count(small))
  assert 0.25 < pruned.macs_after / pruned.macs_before < 0.5   # between keep^2 and keep


def test_bn_scale_keeps_the_largest_gammas():
  rng = np.random.default_rng(3)
  g1, g2, g3 = _ranks(rng, 6), _ranks(rng, 6), _ranks(rng, 8)
  # Filter norms in the opposite order, so the two criteria disagree.
  user = _weights(scale={"stem_bn": g1, "bn2": g2, "bn1": g3, "stem": 3.0 - g1 - g2 + 1.0,
                         "conv2": np.ones(6), "conv1": 3.0 - g3})
  x, supernet, space, variables = _elasticize(user)
  by_gamma = prune_lib.prune(supernet, variables, space, keep=0.5, criterion="bn_scale")
  by_l1 = prune_lib.prune(supernet, variables, space, keep=0.5, criterion="l1")
  top, top_mid = np.argsort(-(g1 + g2))[:3], np.argsort(-g3)[:4]
  params = user["params"]
  np.testing.assert_array_equal(_user(by_gamma)["stem_bn"]["scale"],
                                params["stem_bn"]["scale"][top])
  np.testing.assert_array_equal(_user(by_gamma)["block"]["bn1"]["scale"],
                                params["block"]["bn1"]["scale"][top_mid])
  assert set(np.abs(_user(by_l1)["stem_bn"]["scale"]).tolist()).isdisjoint(g1[top].tolist())
  assert by_gamma.ranking == "bn_scale" and by_l1.ranking == "filters"


def test_saved_variables_load_into_the_plain_module_at_the_pruned_widths(tmp_path):
  x, supernet, space, variables = _elasticize(_weights(4))
  pruned = prune_lib.prune(supernet, variables, space, keep=0.5, criterion="l1")
  prune_lib.save_pruned(pruned, str(tmp_path))
  summary = json.loads((tmp_path / prune_lib.SUMMARY_FILE).read_text())
  widths = summary["layer_widths"]
  assert widths == {"stem": 3, "stem_bn": 3, "block/conv1": 4, "block/bn1": 4,
                    "block/conv2": 3, "block/bn2": 3, "head": 10}
  assert summary["arch"]["width"] == np.asarray(pruned.arch["width"]).tolist()
  assert summary["macs"] == {"before": _macs(*FULL), "after": _macs(3, 4)}
  assert summary["keep"] == 0.5 and summary["criterion"] == "l1"
  loaded = prune_lib.load_pruned_variables(str(tmp_path))
  plain = _run(WideCNN((widths["stem"], widths["block/conv1"])).apply, loaded, x)
  np.testing.assert_allclose(plain, _run(pruned.dense_model.apply, pruned.dense_variables, x),
                             atol=1e-6, rtol=1e-6)
  with pytest.raises(FileNotFoundError, match="not a directory that save_pruned"):
    prune_lib.load_pruned_variables(str(tmp_path / "nothing"))


def test_bad_input_is_named():
  _, supernet, space, variables = _elasticize(_weights())
  # Both groups round to none; the smaller one is named (with both layers the residual add
  # ties), with the least keep that leaves it a channel: round(keep * 6) >= 1 needs keep > 1/12.
  with pytest.raises(ValueError, match=r"by stem, block/conv2 \(6 channels, divisor 1\).*"
                     r"above 0\.08333 leaves it 1 channel;"):
    prune_lib.prune(supernet, variables, space, keep=0.05)
  with pytest.raises(ValueError, match=r"by stem, block/conv2 \(6 channels, divisor 4\).*"
                     r"above 0\.3333 leaves it 4 channels;"):
    prune_lib.prune(supernet, variables, space, keep=0.3, divisor=4)   # 8 -> 4, 6 -> 0
  for keep in (0.0, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
      prune_lib.prune(supernet, variables, space, keep=keep)
  with pytest.raises(ValueError, match=r"criterion must be one of \['bn_scale', 'l1'\]"):
    prune_lib.prune(supernet, variables, space, criterion="l2")
  x = jnp.zeros((2, 8, 8, 1))
  mlp, mlp_space, mlp_variables = ofajax.elasticize(MLP(), x)
  with pytest.raises(ValueError, match=r"Dense_0 \(48 channels\) is not normalised by a Batch"):
    prune_lib.prune(mlp, mlp_variables, mlp_space, criterion="bn_scale")


def test_builtin_supernets_prune_cannot_rank_are_refused():
  model, space = ofajax.models.get("elastic_vit_tiny")
  with pytest.raises(NotImplementedError, match="built-in CNN supernets"):
    prune_lib.prune(model, {}, space)
  model, space = ofajax.models.get("compofa_mbv3_tiny")   # expand is 6 wherever depth is full
  with pytest.raises(ValueError, match=r"no smaller middle width at full depth.*search_space\(\)"):
    prune_lib.prune(model, {}, space)


def test_slim_mobilenet_v2_prunes_its_middle_channels():
  model, space = ofajax.models.get("slim_mobilenet_v2_tiny", resolutions=(8,), head_base_width=32,
                                   settings=((1, 8, 1, 1), (6, 16, 2, 2)))
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 8, 8, 1)), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, space.largest())
  rng = np.random.default_rng(6)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.uniform(0.5, 1.5, s.shape) if jax.tree_util.keystr(p).endswith(
          "['var']") else rng.standard_normal(s.shape) * 0.3).astype(np.float32), abstract)
  pruned = prune_lib.prune(model, variables, space, keep=0.5)
  mids = [i for i, label in enumerate(model.width_groups()) if label.endswith("_mid")]
  full = space.largest()["width"]
  for i, (w, f) in enumerate(zip(pruned.arch["width"], full)):
    allowed = space.allowed_values("width", (i,))
    expect = min(allowed, key=lambda v: (abs(v - 0.5 * f), -v)) if i in mids else f
    assert w == expect, (i, w, f)
  ranked = ofajax.channel_sorting.sort_channels(model, variables)
  masked = _run(model.apply, ranked, x, _arch(pruned))
  dense = _run(pruned.dense_model.apply, pruned.dense_variables, x)
  np.testing.assert_allclose(dense, masked, atol=1e-5, rtol=1e-5)
  assert pruned.macs_after < pruned.macs_before and pruned.ranking == "consumers (OFA)"
  with pytest.raises(ValueError, match="for elasticized models"):
    prune_lib.prune(model, variables, space, criterion="bn_scale")


# --------------------------------------------------------------------------- workdirs


def wide_cnn():
  """The factory config.model_options names ("test_prune:wide_cnn")."""
  return WideCNN(), jnp.zeros((1,) + SHAPE[1:])


def _workdir(path: str, variables) -> str:
  """A workdir as train.py leaves it: config.json and one checkpoint (written directly)."""
  config = ml_collections.ConfigDict({"model": "elasticize", "resolution": SHAPE[1],
                                      "execution": "masked"})
  config.model_options = ml_collections.ConfigDict({"factory": "test_prune:wide_cnn",
                                                    "skippable": ("block",)})
  write_config(path, config)
  tx = optax.sgd(0.1)
  ckpt = Checkpoints(path)
  ckpt.save(3, new_state(variables, tx.init(variables["params"]), jax.random.key(0), 3),
            {"step": 3})
  ckpt.close()
  return path


def test_prune_workdir_and_the_command_line(tmp_path, capsys):
  x, supernet, space, variables = _elasticize(_weights(7))
  workdir = _workdir(str(tmp_path / "w"), variables)
  pruned = prune_lib.prune_workdir(workdir, str(tmp_path / "lib"), keep=0.5)
  assert "MACs 84,156 -> 28,254" in capsys.readouterr().out
  expected = prune_lib.prune(supernet, variables, space, keep=0.5)
  np.testing.assert_allclose(_run(pruned.dense_model.apply, pruned.dense_variables, x),
                             _run(expected.dense_model.apply, expected.dense_variables, x),
                             atol=1e-6)

  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tests')}",
             JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, os.path.join(ROOT, "prune.py"), *args],
                                     cwd=ROOT, env=env, capture_output=True, text=True,
                                     timeout=120)
  out = run("--workdir", workdir, "--out", str(tmp_path / "cli"), "--criterion", "bn_scale")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "MACs 84,156 -> 28,254" in out.stdout
  summary = json.loads((tmp_path / "cli" / prune_lib.SUMMARY_FILE).read_text())
  assert summary["criterion"] == "bn_scale" and summary["step"] == 3
  loaded = prune_lib.load_pruned_variables(str(tmp_path / "cli"))
  assert loaded["params"]["stem"]["kernel"].shape == (5, 5, 3, 3)
  out = run("--workdir", workdir, "--out", str(tmp_path / "bad"), "--keep", "1.5")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith("error: keep is the share")
