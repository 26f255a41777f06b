"""OFA's channel sorting of CNN supernets (``ofajax.channel_sorting``, re-exported as
``ofajax.importance.sort_channels``): the full network is unchanged, importance ends up sorted,
sorting twice changes nothing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from ofajax import channel_sorting, importance, models

RESOLUTION = 28
SUPERNETS = ("ofa_mbv3_tiny", "ofa_resnet50_tiny", "slim_mobilenet_v2_tiny")
# compofa_mbv3 is ofa_mbv3's supernet in CompOFA's space: its largest arch (kernels 3/5) is
# checked too, through the kernel transforms.
SPACES = {"ofa_mbv3_tiny": ("search_space", "compofa_space")}
# Options that only make the forward compile faster (sorting does not depend on them): XLA's
# depthwise conv instead of 49 shifted taps per block; fewer active-execution branches.
FAST = {"ofa_mbv3_tiny": dict(depthwise_impl="xla"),
        "slim_mobilenet_v2_tiny": dict(depthwise_impl="xla"),
        "ofa_resnet50_tiny": dict(active_branches="width")}
# Active execution compiles a branch per middle width (and kernel size) of every block: its
# checks run on shallower supernets (one block of each kind per stage) to compile in seconds.
SHALLOW = {"ofa_mbv3_tiny": dict(depth_choices=(1,)),
           "ofa_resnet50_tiny": dict(extra_depths=(0,))}
# Random kernels' gain over unit variance: with BN statistics that do not match the activations,
# a random net's signal vanishes or explodes with depth; these keep the logits input-dependent
# (asserted below), so that a channel moved wrongly shows.
GAIN = {"ofa_mbv3_tiny": 1.5, "ofa_resnet50_tiny": 1.2, "slim_mobilenet_v2_tiny": 1.3}


@functools.cache
def _model(name, execution="masked"):
  shallow = SHALLOW.get(name, {}) if execution == "active" else {}
  return models.with_execution(models.get(name, **FAST.get(name, {}), **shallow)[0], execution)


@functools.cache
def _random_variables(name, seed, execution="masked"):
  """Random variables of the model's shapes, drawn with NumPy from ``eval_shape`` (no init
  compile: the tiny supernets' inits take 5-13 s each on 2 cores). Random kernels leave the
  channels unsorted; BN statistics and kernel transforms are moved off their defaults so that
  permuting them wrongly would show in the logits."""
  gain = GAIN[name]
  model = _model(name, execution)
  x = models.sample_input(model, RESOLUTION, 2)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, model.search_space().largest())
  rng = np.random.default_rng(seed)

  def fill(path, s):
    leaf, shape = path[-1].key, s.shape
    normal = lambda scale: (scale * rng.standard_normal(shape)).astype(np.float32)
    if leaf == "mean":
      return normal(0.1)
    if leaf == "var":
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if leaf.startswith("transform_"):
      return np.eye(shape[0], dtype=np.float32) + normal(0.1)
    if leaf == "scale":
      return 1.0 + normal(0.2)
    if leaf == "bias":
      return normal(0.1)
    return normal(gain / np.sqrt(np.prod(shape[:-1])))   # kernels

  return jax.tree_util.tree_map_with_path(fill, {"params": shapes["params"],
                                                 "batch_stats": shapes["batch_stats"]})


@functools.cache
def _forward(name, execution):
  """The eval-mode forward ``(variables, x, arch) -> logits``, compiled once (the arch is an
  argument, so OFA's and CompOFA's largest archs share it) with ``models.FAST_COMPILE``."""
  model = _model(name, execution)
  forward = jax.jit(lambda v, x, arch: model.apply(v, x, arch, train=False))
  return forward.lower(_random_variables(name, 1, execution), _inputs(model),
                       model.search_space().largest()).compile(
                           compiler_options=models.FAST_COMPILE)


def _inputs(model):
  rng = np.random.default_rng(2)
  return rng.standard_normal((2, RESOLUTION, RESOLUTION, model.in_channels)).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(SUPERNETS))
def setup(request):
  model, variables = _model(request.param), _random_variables(request.param, 1)
  return request.param, model, variables, importance.sort_channels(model, variables)


@pytest.mark.parametrize("execution", ["masked", "active"])
@pytest.mark.parametrize("name", sorted(SUPERNETS))
def test_full_network_unchanged(name, execution):
  model, variables = _model(name, execution), _random_variables(name, 1, execution)
  sorted_vars = importance.sort_channels(model, variables)
  moves = channel_sorting.channel_orders(model, variables)
  # Something really moved, else the check below would hold trivially.
  assert any((m.order != np.arange(m.order.size)).any() for m in moves)
  forward, x = _forward(name, execution), _inputs(model)
  # CompOFA's space needs depths 2-4: the shallow (active) supernets have OFA's space only.
  spaces = SPACES.get(name, ("search_space",)) if execution == "masked" else ("search_space",)
  for space in spaces:
    arch = getattr(model, space)().largest()
    before = np.asarray(forward(variables, x, arch))
    # The logits depend on the input (a degenerate random net would hide wrong moves).
    assert np.abs(before[0] - before[1]).max() > 0.01 * np.abs(before).max(), space
    assert rel_err(forward(sorted_vars, x, arch), before) <= 1e-5, space


def _importances(block):
  """Per sorted axis of a block, its importance as OFA ranks it (after the sort)."""
  l1 = lambda k, axis: np.abs(np.asarray(k)).sum(tuple(a for a in range(k.ndim) if a != axis))
  if "conv3" in block:
    return [l1(block["conv3"]["kernel"], 2), l1(block["conv2"]["kernel"], 2)]
  out = [l1(block["project"]["kernel"], 2)]
  if "se" in block:
    out.append(l1(block["se"]["expand"]["kernel"], 0))
  return out


def test_importance_sorted_and_second_sort_identity(setup):
  _, model, _, sorted_vars = setup
  names = {path[0] for m in channel_sorting.channel_orders(model, sorted_vars)
           for path, _ in m.sites}
  assert names
  for name in names:
    for imp in _importances(sorted_vars["params"][name]):
      assert (np.diff(imp) <= 0).all(), name
  for move in channel_sorting.channel_orders(model, sorted_vars):
    np.testing.assert_array_equal(move.order, np.arange(move.order.size))
  again = importance.sort_channels(model, sorted_vars)
  jax.tree.map(np.testing.assert_array_equal, again, sorted_vars)


def test_jax_arrays_like_numpy(setup):
  """Variables as jax arrays (as training holds them) sort as NumPy ones and stay jax arrays."""
  _, model, variables, sorted_vars = setup
  on_device = importance.sort_channels(model, jax.tree.map(jnp.asarray, variables))
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(on_device))
  jax.tree.map(np.testing.assert_array_equal, on_device, sorted_vars)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_batch_stats_follow(setup):
  name, model, variables, sorted_vars = setup
  bn = ("stage1_block1",) + (("conv2", "bn") if "resnet" in name else ("depthwise_bn",))
  move = next(m for m in channel_sorting.channel_orders(model, variables) if (bn, 0) in m.sites)
  for collection, leaf in (("params", "scale"), ("batch_stats", "mean"), ("batch_stats", "var")):
    path = (collection, *bn, leaf)
    np.testing.assert_array_equal(_at(sorted_vars, path),
                                  np.asarray(_at(variables, path))[move.order])


@pytest.mark.parametrize("name", ["ofa_mbv3_tiny", "ofa_resnet50_tiny"])
def test_expand_stage_keeps_earlier_prefixes(name):
  model, variables = _model(name), _random_variables(name, 1)
  moves = channel_sorting.channel_orders(model, variables, expand_stage=1)
  widths = {block.name: block.widths for block in channel_sorting.sortable_blocks(model)}
  for move in moves:
    if any(path[-2:] == ("reduce", "kernel") and axis == 1 for path, axis in move.sites):
      continue   # SE hidden units: no expand phases, sorted whole
    bound = sorted(set(widths[move.sites[0][0][0]]))[-2]   # 2nd largest middle width
    assert (move.order[:bound] < bound).all() and (move.order[bound:] >= bound).all()
    assert (move.order[:bound] != np.arange(bound)).any()
  full = channel_sorting.channel_orders(model, variables)
  assert any((a.order != b.order).any() for a, b in zip(moves, full))
  new = importance.sort_channels(model, variables, expand_stage=1)
  for block, block_widths in widths.items():   # sorted within each segment
    bound = sorted(set(block_widths))[-2]
    for imp in _importances(new["params"][block]):
      assert (np.diff(imp[:bound]) <= 0).all() and (np.diff(imp[bound:]) <= 0).all(), block
  forward, x, arch = _forward(name, "masked"), _inputs(model), model.search_space().largest()
  assert rel_err(forward(new, x, arch), forward(variables, x, arch)) <= 1e-5


def test_errors():
  bert, _ = models.get("elastic_bert_tiny")
  with pytest.raises(ValueError, match="reorder_by_importance"):
    importance.sort_channels(bert, {"params": {}})
  with pytest.raises(ValueError, match="lack params"):
    importance.sort_channels(_model("ofa_mbv3_tiny"), {"params": {}})
  with pytest.raises(ValueError, match="no expand phases"):
    importance.sort_channels(_model("slim_mobilenet_v2_tiny"),
                             _random_variables("slim_mobilenet_v2_tiny", 1), expand_stage=1)
  with pytest.raises(ValueError, match="expand_stage must be in"):
    importance.sort_channels(_model("ofa_mbv3_tiny"), _random_variables("ofa_mbv3_tiny", 1),
                             expand_stage=3)
