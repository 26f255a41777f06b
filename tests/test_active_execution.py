"""Active-size execution equals masked execution: logits, every gradient, BatchNorm statistics.

A small OFA MobileNetV3 (two elastic stages of two blocks, SE in the second, the full kernel /
expand choices) keeps compilation short; the layers are the ones ofa_mbv3 and compofa_mbv3 use.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofajax import evaluation, layers, models
from ofajax.layers import branching, conv
from ofajax.models.ofa_mbv3 import OFAMobileNetV3
from conftest import assert_close_trees

SMALL = dict(num_classes=10, base_widths=(8, 8, 16, 24, 48, 64), strides=(1, 2, 2),
             acts=("relu", "relu", "h_swish"), use_se=(False, False, True),
             depth_choices=(1, 2), in_channels=1, dropout_rate=0.0, resolutions=(16,))


def _small(execution):
  return OFAMobileNetV3(execution=execution, **SMALL)


_TRACES = collections.Counter()   # model -> times _outputs traced it


@functools.partial(jax.jit, static_argnums=0)
def _outputs(model, variables, x, arch):
  """Eval logits, the train-mode loss's gradients, the updated batch_stats."""
  _TRACES[model] += 1
  def loss(params):
    logits, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                arch, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(logits)), state["batch_stats"]

  grads, stats = jax.grad(loss, has_aux=True)(variables["params"])
  return model.apply(variables, x, arch, train=False), grads, stats


@pytest.fixture(scope="module")
def small_setup():
  masked, active = _small("masked"), _small("active")
  space = masked.search_space()
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
  variables = models.init(masked, jax.random.key(1), x)
  # non-trivial running statistics, so eval mode reads a real prefix
  variables["batch_stats"] = jax.tree.map(
      lambda v: v + 0.1 * jax.random.uniform(jax.random.key(2), v.shape),
      variables["batch_stats"])
  return masked, active, space, x, variables


def _assert_modes_agree(masked, active, space, variables, x, seed, rel):
  """Largest, smallest and 3 random archs: logits to ``rel``, every gradient to ``rel`` of the
  largest entry, batch statistics to ``rel / 10``; one trace of ``active`` for all of them."""
  archs = [space.largest(), space.smallest()] + [space.sample(jax.random.key(seed + i))
                                                for i in range(3)]
  before = _TRACES[active]
  for arch in archs:
    logits_m, grads_m, stats_m = _outputs(masked, variables, x, arch)
    logits_a, grads_a, stats_a = _outputs(active, variables, x, arch)
    np.testing.assert_allclose(logits_a, logits_m, rtol=rel, atol=rel)
    assert_close_trees(grads_m, grads_a, rel)
    assert_close_trees(stats_m, stats_a, rel / 10)
  assert _TRACES[active] - before <= 1   # 0 when an earlier test traced it already


def test_active_matches_masked_logits_gradients_and_stats(small_setup):
  masked, active, space, x, variables = small_setup
  _assert_modes_agree(masked, active, space, variables, x, seed=10, rel=1e-5)


def test_active_compiles_once_across_archs(small_setup):
  _, active, space, x, variables = small_setup
  traces = []

  @jax.jit
  def forward(variables, arch):
    traces.append(1)
    return active.apply(variables, x, arch, train=False)

  for i in range(4):
    forward(variables, space.sample(jax.random.key(20 + i)))
  assert len(traces) == 1


def test_active_compofa_space(small_setup):
  masked, active, _, x, variables = small_setup
  # CompOFA's construction (fixed kernel per stage, expand coupled to depth) on the small net
  space = masked.search_space().restrict(kernel=[[3], [5]]).couple("expand", {1: 3, 2: 6})
  arch = space.sample(jax.random.key(3))
  assert int(arch["expand"][0, 0]) == (3 if int(arch["depth"][0]) == 1 else 6)
  np.testing.assert_allclose(_outputs(active, variables, x, arch)[0],
                             _outputs(masked, variables, x, arch)[0], rtol=1e-5, atol=1e-5)


def test_depthwise_choice_equals_padded_conv():
  """The gradient through the zero padding (what the model differentiates) is the same."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
  small = jax.random.normal(jax.random.key(1), (5, 5, 1, 6))
  pad = lambda k: jnp.pad(k, ((1, 1), (1, 1), (0, 0), (0, 0)))
  for stride in (1, 2):
    def masked(x, k):
      return jnp.sum(jnp.cos(conv.depthwise_conv2d(x, pad(k), stride)))

    def active(x, k):
      return jnp.sum(jnp.cos(conv.depthwise_conv2d_choice(x, pad(k), 1, (3, 5, 7), stride)))

    np.testing.assert_allclose(active(x, small), masked(x, small), rtol=1e-6)
    for g_a, g_m in zip(jax.grad(active, (0, 1))(x, small), jax.grad(masked, (0, 1))(x, small)):
      np.testing.assert_allclose(g_a, g_m, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(g_m))))


def test_evaluator_runs_vmapped_archs_masked(small_setup):
  _, active, space, x, variables = small_setup
  batches = [{"inputs": x, "label": jnp.arange(4) % 10, "mask": jnp.ones(4)}]
  vmapped = evaluation.Evaluator(active, variables, x[None], batches, 4, chunk_size=2,
                                 archs_per_call=2)
  one_by_one = evaluation.Evaluator(active, variables, x[None], batches, 4, chunk_size=1,
                                    archs_per_call=1)
  assert vmapped.model.execution == "masked" and one_by_one.model.execution == "active"
  archs = [space.sample(jax.random.key(30 + i)) for i in range(2)]
  for a, b in zip(vmapped(archs), one_by_one(archs)):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


# Two-stage OFA-ResNet (four bottlenecks, the full width / expand / depth choices): the tiny
# variant's 18 blocks take minutes to compile in float64.
SMALL_RESNET = dict(stem_width=16, base_widths=(32, 48), base_depths=(1, 1), strides=(1, 2),
                    extra_depths=(0, 1))


# Three stages of the slimmable MobileNetV2 (a t = 1 block, a residual-tied stage, stride 2).
SMALL_SLIM = dict(settings=((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2)), head_base_width=64)


@pytest.mark.parametrize("name,options", [
    ("slim_mobilenet_v2_tiny", SMALL_SLIM),
    ("ofa_resnet50_tiny", dict(SMALL_RESNET, active_branches="width")),
    ("ofa_resnet50_tiny", dict(SMALL_RESNET, active_branches="width_expand"))])
def test_bucketed_models_match_masked(name, options):
  """Per-layer-width supernets run active at static width buckets (slimmable MobileNetV2) or
  exact width x expand branches (OFA-ResNet50): the same logits, every gradient and the same
  BatchNorm statistics as masked execution, and one trace for every arch. Float64, because
  train-mode BatchNorm over a 4-image batch at 1x1 feature maps amplifies float32 round-off
  (summation order) to ~1e-3 in some gradients."""
  with jax.enable_x64(True):
    masked, space = models.get(name, execution="masked", **options)
    active = masked.clone(execution="active")
    res = space.resolutions[0]
    x = jax.random.normal(jax.random.key(0), (4, res, res, masked.in_channels), jnp.float64)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64),
                             models.init(masked, jax.random.key(1), x))
    variables["batch_stats"] = jax.tree.map(
        lambda v: v + 0.1 * jax.random.uniform(jax.random.key(2), v.shape, v.dtype),
        variables["batch_stats"])
    _assert_modes_agree(masked, active, space, variables, x, seed=40, rel=1e-10)


def test_branch_choice_and_buckets():
  widths = [(8, 16, 8), (16, 24, 16), (16, 48, 24)]
  pick = lambda *actives: int(branching.branch_index(actives, widths))
  assert pick(8, 16, 8) == 0 and pick(9, 16, 8) == 1 and pick(8, 16, 24) == 2
  assert pick(None, 20, None) == 1 and pick(None, None, None) == 2   # no constraint: the full
  assert branching.bucket_widths(range(16, 97, 8), (0.5, 0.75)) == (48, 72, 96)
  assert branching.bucket_widths((24, 40, 64), (0.3, 1.0)) == (24, 64)
  with pytest.raises(ValueError, match="full widths"):
    branching.cheapest_first([(8, 48), (16, 16)], np.prod)


@pytest.mark.parametrize("name", ["slim_mobilenet_v2_tiny", "ofa_resnet50_tiny"])
def test_unknown_execution_says_what_exists(name):
  model, space = models.get(name, execution="fast")
  x = models.sample_input(model, space.resolutions[0], 2)
  with pytest.raises(ValueError, match="execution must be one of"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, space.largest()))


def test_elastic_batchnorm_active_prefix_updates_only_the_prefix():
  bn = layers.ElasticBatchNorm(size=8)
  variables = bn.init(jax.random.key(0), jnp.ones((2, 8)), True)
  x = jax.random.normal(jax.random.key(1), (16, 5)) + 3.0
  _, state = bn.apply(variables, x, True, mutable=["batch_stats"])
  mean = state["batch_stats"]["mean"]
  np.testing.assert_allclose(mean[:5], 0.1 * jnp.mean(x, 0), rtol=1e-5)
  np.testing.assert_array_equal(mean[5:], 0.0)
