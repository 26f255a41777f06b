"""OFA-ResNet50 supernet: export equivalence, one trace, cost vs ResNet-50-D and XLA, OFA's arch
encoding, BN calibration through gated blocks."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ofajax
from ofajax import bn, cost, export
from ofajax.models import ofa_resnet50
from ofajax.models.mobilenet import count_params
from ofajax.models.resnet import dense_cost
from conftest import conv_and_dot_flops, rel_err


def random_variables(model, x, seed: int) -> dict:
  """He-scaled random weights and non-trivial BN statistics / affines at the supernet's shapes,
  as numpy (no compiled init, and slicing for export costs no XLA ops)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, model.search_space().largest()))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    shape, name = leaf.shape, path[-1]
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
    if name.startswith("transform_"):  # OFA's kernel transforms, away from their identity init
      return (np.eye(shape[0]) + 0.1 * rng.normal(size=shape)).astype(np.float32)
    values = {"scale": lambda: 1 + 0.1 * rng.normal(size=shape),
              "bias": lambda: 0.1 * rng.normal(size=shape),
              "mean": lambda: 0.3 * rng.normal(size=shape),
              "var": lambda: rng.uniform(0.5, 2.0, shape)}[name]()
    return values.astype(np.float32)
  flat = flax.traverse_util.flatten_dict(abstract)
  return flax.traverse_util.unflatten_dict({k: fill(k, v) for k, v in flat.items()})


def sample_archs(space, key, n: int) -> list[dict]:
  """``n`` random archs from one compiled sampler, as numpy."""
  archs = jax.device_get(jax.jit(jax.vmap(space.sample))(jax.random.split(key, n)))
  return [{k: v[i] for k, v in archs.items()} for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
  model, space = ofajax.models.get("ofa_resnet50_tiny")
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  return model, space, x, random_variables(model, x, 1)


def test_export_equals_masked_supernet_with_one_trace(tiny):
  model, space, x, variables = tiny

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(variables, x, arch):
    return model.apply(variables, x, arch, train=False)

  chex.clear_trace_counter()
  archs = [space.largest(), space.smallest()] + sample_archs(space, jax.random.key(3), 20)
  exported = [export.extract_subnet(model, variables, arch, space) for arch in archs]
  # The dense subnets are ordinary models with static shapes; one compiled call runs them all
  # (22 separate compiles cost ~3x as much on XLA:CPU).
  dense_forward = jax.jit(lambda dvs, x: [m.apply(v, x) for (m, _), v in zip(exported, dvs)],
                          compiler_options=ofajax.models.FAST_COMPILE)
  dense_outputs = dense_forward([v for _, v in exported], x)
  seen = {"stem": set(), "width": set(), "expand": set()}
  for arch, (dense_model, dense_vars), got in zip(archs, exported, dense_outputs):
    assert rel_err(got, forward(variables, x, arch)) <= 1e-5, space.name(arch)
    analytic = cost.count(model, arch, 28)
    assert count_params(dense_vars["params"]) == analytic["params"]
    assert dense_cost(dense_model, 28, 1) == analytic
    seen["stem"].add(dense_model.stem_residual)
    seen["width"] |= {b.out_channels for b in dense_model.blocks}
    seen["expand"] |= set(np.asarray(arch["expand"]).ravel().tolist())
  assert seen["stem"] == {True, False} and seen["expand"] == {20, 25, 35}
  assert seen["width"] == {w for s in range(4) for w in model.stage_widths(s)}


def test_resnet50d_and_extremes_cost():
  """ResNet-50-D (He et al., CVPR 2019) is the subnet d=(3, 4, 6, 3), e=0.25, w=1.0 with the
  3-conv stem: 25,576,264 params (timm's resnet50d) and 4.33G MACs (ResNet-50's 4,089,184,256
  plus the deep stem's 239,640,576)."""
  model, space = ofajax.models.get("ofa_resnet50")
  r50d = {"stem_depth": 3, "depth": [3, 4, 6, 3], "expand": np.full((4, 6), 25), "width": [2] * 6}
  assert cost.count(model, r50d, 224) == {"macs": 4_328_824_832, "params": 25_576_264}
  assert cost.count(model, space.largest(), 224) == {"macs": 7_491_643_904, "params": 48_105_992}
  assert cost.count(model, space.smallest(), 224) == {"macs": 962_192_128, "params": 6_539_280}
  # OFA's specialised ResNet50D subnets span 0.6B-4.1B MACs (once-for-all README).
  assert cost.count(model, space.smallest(), 160)["macs"] < 0.6e9


def test_cost_inside_jit_matches_host():
  model, space = ofajax.models.get("ofa_resnet50")

  def sample_and_count(key):
    arch = space.sample(key)
    return arch, cost.count(model, arch, 192)
  archs, traced = jax.device_get(jax.jit(jax.vmap(sample_and_count),
                                         compiler_options=ofajax.models.FAST_COMPILE)(
      jax.random.split(jax.random.key(0), 8)))
  for i in range(8):
    host = cost.count(model, {k: v[i] for k, v in archs.items()}, 192)
    assert abs(float(traced["macs"][i]) - host["macs"]) <= 1e-6 * host["macs"]
    assert abs(float(traced["params"][i]) - host["params"]) <= 1e-6 * host["params"]


def test_analytic_macs_agree_with_xla_cost_analysis():
  """Full-size largest subnet at 56x56 (odd 7x7 maps, so ceil-mode pooling and padding matter;
  equal blocks share one compiled conv)."""
  model, space = ofajax.models.get("ofa_resnet50")
  arch = space.largest()
  x = jnp.zeros((1, 56, 56, 3))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, arch))
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  dense_model, dense_vars = export.extract_subnet(model, variables, arch, space)
  xla_flops = conv_and_dot_flops(lambda v, x: dense_model.apply(v, x), dense_vars, x)
  xla_convention = dense_cost(dense_model, 56, 3, exclude_padding=True)["macs"]
  assert abs(xla_flops / 2 - xla_convention) <= 0.02 * xla_convention
  # On 7x7 and smaller maps a large share of OFA's taps land on padding, which XLA skips.
  assert 0.8 < xla_flops / 2 / cost.count(model, arch, 56)["macs"] <= 1.0


def test_ofa_arch_encoding_round_trips():
  model, space = ofajax.models.get("ofa_resnet50")
  for arch in [space.largest(), space.smallest()] + sample_archs(space, jax.random.key(4), 1):
    ofa = ofa_resnet50.to_ofa_arch(model, arch)
    assert len(ofa["d"]) == 5 and len(ofa["e"]) == 18 and len(ofa["w"]) == 6
    back = ofa_resnet50.from_ofa_arch(model, ofa)
    assert space.name(back) == space.name(arch)
  ofa = ofa_resnet50.to_ofa_arch(model, space.smallest())
  assert ofa["d"] == [0, 0, 0, 0, 0] and ofa["w"] == [0] * 6 and set(ofa["e"]) == {0.2}
  # OFA skips the stem conv whenever d[0] != max(depth_list), e.g. d[0] = 1.
  assert int(ofa_resnet50.from_ofa_arch(model, dict(ofa, d=[1, 0, 0, 0, 0]))["stem_depth"]) == 2
  with pytest.raises(ValueError, match="e\\[18\\]"):
    ofa_resnet50.from_ofa_arch(model, dict(ofa, e=ofa["e"][:-1]))
  with pytest.raises(ValueError, match="leaf 'depth' at position \\(2,\\): value 3"):
    space.validate({**space.largest(), "depth": [4, 4, 3, 4]})  # stage 2 has 4-6 blocks


def test_bn_calibration_through_gated_blocks(tiny):
  """calibrate_bn runs through the depth-gated blocks and the optional stem conv: for every layer
  a subnet executes, its calibrated statistics are the batch moments a train-mode step of that
  subnet uses (recovered from the momentum update)."""
  model, space, _, variables = tiny
  # 16 images, not the fixture's 2: at the last stage (2x2 pixels) a batch of 2 gives BN 8
  # values per channel, and normalising by so small a variance amplifies float32 rounding
  # differences between the two (equally valid) compiled paths past any tolerance.
  x = jax.random.normal(jax.random.key(1), (16, 28, 28, 1))

  @jax.jit
  def calibrate_and_train(variables, arch):  # one compile serves both archs
    stats = bn.calibrate_one(model, variables, arch, x[None])
    _, updates = model.apply(variables, x, arch, train=True, mutable=["batch_stats"])
    moments = jax.tree.map(lambda new, old: (new - 0.9 * old) / 0.1, updates["batch_stats"],
                           variables["batch_stats"])
    return stats, moments

  for arch in [space.smallest()] + sample_archs(space, jax.random.key(5), 1):
    stats, moments = calibrate_and_train(variables, arch)
    dense = model.dense_model(arch)
    executed = ["stem0", "stem2"] + ["stem1"] * dense.stem_residual + [b.name for b in dense.blocks]
    for name in executed:  # (new - 0.9 old) / 0.1 magnifies float32 rounding tenfold
      chex.assert_trees_all_close(stats[name], moments[name], atol=2e-3, rtol=2e-3)
    assert len(executed) < len(stats)  # some blocks were skipped
