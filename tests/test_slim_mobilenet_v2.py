"""Slimmable MobileNetV2: export equals the masked supernet, masks are exact, residual ties,
validation, cardinality, and the full-size cost against the MobileNetV2 paper."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import ofajax
from ofajax import cost
from ofajax.layers import ElasticBatchNorm, ElasticConvBN, ElasticMBConv
from ofajax.models.mobilenet import count_params

RES = 28


def _random_variables(model, space, x, seed):
  """Supernet variables with random weights, BN affine params and running statistics (positive
  variances), so a channel that is not masked to zero, or a statistic sliced from the wrong
  position, shows up in the outputs. Host numpy arrays: no init compile, and slicing them for
  export costs nothing."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, space.largest())
  rng = np.random.default_rng(seed)

  def fill(path, s):
    names = [p.key for p in path]
    if names[-1] == "var":
      v = rng.uniform(0.5, 2.0, s.shape)
    elif names[-1] == "mean":
      v = 0.5 * rng.normal(size=s.shape)
    elif names[-1] == "scale":
      v = rng.uniform(0.5, 1.5, s.shape)
    elif names[-1] == "bias":
      v = 0.2 * rng.normal(size=s.shape)
    else:  # conv / dense kernels: He normal on the fan-in
      v = rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    return v.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
  model, space = ofajax.models.get("slim_mobilenet_v2_tiny")
  x = jax.random.normal(jax.random.key(0), (2, RES, RES, 1))
  return model, space, _random_variables(model, space, x, seed=1), x


def _archs(space, n, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return [space.largest(), space.smallest()] + [space.sample(k) for k in keys]


def _rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


# Each dense subnet has its own static shapes, so its own compile; XLA's cheapest backend passes
# keep that to about a second on CPU (the numbers are the same to float rounding).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _check_export(model, space, variables, x, archs):
  traces = []

  @jax.jit
  def forward(variables, x, arch):
    traces.append(1)
    return model.apply(variables, x, arch, train=False)

  for arch in archs:
    arch = space.validate(arch)
    dense, dense_vars = ofajax.export.extract_subnet(model, variables, arch, space)
    # The sliced tree is exactly the dense model's (no missing, extra or misshapen variables).
    expect = jax.eval_shape(dense.init, jax.random.key(0), x)
    assert jax.tree.structure(dense_vars) == jax.tree.structure(expect)
    assert jax.tree.map(np.shape, dense_vars) == jax.tree.map(lambda s: s.shape, expect)
    sup = forward(variables, x, arch)
    out = jax.jit(dense.apply, compiler_options=FAST_COMPILE)(dense_vars, x)
    assert _rel_err(sup, out) <= 1e-5, space.name(arch)
    assert count_params(dense_vars["params"]) == cost.count(model, arch, x.shape[1])["params"]
  assert len(traces) == 1  # one compiled supernet serves every arch


# --------------------------------------------------------------------------- export


def test_dense_export_matches_supernet_and_cost(tiny):
  model, space, variables, x = tiny
  archs = _archs(space, 20)
  _check_export(model, space, variables, x, archs)
  # The traced cost (inside jit, vmapped over archs) agrees with the exact host count.
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *archs)
  traced = jax.jit(jax.vmap(lambda a: cost.count(model, a, RES)))(stacked)
  for i, arch in enumerate(archs):
    host = cost.count(model, arch, RES)
    assert int(traced["macs"][i]) == host["macs"] and int(traced["params"][i]) == host["params"]
  # MACs grow with width: largest > every sample > smallest.
  macs = [cost.count(model, a, RES)["macs"] for a in archs]
  assert macs[0] == max(macs) and macs[1] == min(macs) and macs[0] > macs[1]


def test_first_block_depthwise_runs_on_stem_width(tiny):
  model, space, _, _ = tiny
  arch = {k: np.array(v) for k, v in space.largest().items()}
  first = model.block_specs(arch)[0]
  assert first.name == "stage0_block0" and not first.has_expand
  assert first.in_channels == first.mid_channels == arch["width"][0] == 16
  base = cost.count(model, arch, RES)
  arch["width"][0] = 8  # only the stem (= first depthwise) width changes
  small = cost.count(model, arch, RES)
  hw = 14  # after the stride-2 stem
  stem_macs = hw * hw * 9 * 1 * 8
  dw_macs = hw * hw * 9 * 8
  project_macs = hw * hw * 8 * 8
  assert base["macs"] - small["macs"] == stem_macs + dw_macs + project_macs
  assert base["params"] - small["params"] == (9 * 8 + 2 * 8) + (9 * 8 + 2 * 8) + 8 * 8


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("train", [False, True])
def test_inactive_channels_are_exactly_zero(tiny, train):
  model, space, variables, x = tiny
  group = {label: i for i, label in enumerate(model.width_groups())}
  plan_blocks = [s.name for s in model.block_specs(space.largest())]

  def capture_fn(variables, x, arch):
    _, state = model.apply(
        variables, x, arch, train=train, mutable=["intermediates", "batch_stats"],
        capture_intermediates=lambda mdl, method: method == "__call__" and isinstance(
            mdl, (ElasticConvBN, ElasticMBConv, ElasticBatchNorm)))
    return state["intermediates"]

  traces = []
  capture = jax.jit(lambda *args: traces.append(1) or capture_fn(*args))

  def active_width(path, width):
    top = path[0]
    if top in ("stem", "head"):
      return width[group[top]]
    stage_block = top
    out_label = re.match(r"(stage\d+)_block\d+", stage_block).group(1) + "_out"
    out = [g for label, g in group.items() if out_label in label.split("+")][0]
    if path[1] in ("expand", "depthwise_bn"):
      mid = group.get(f"{stage_block}_mid")
      return width[mid if mid is not None else group["stem"]]  # t = 1: depthwise on the input
    return width[out]

  for arch in _archs(space, 3, seed=1):
    width = np.asarray(arch["width"])
    flat = traverse_util.flatten_dict(capture(variables, x, arch))
    seen = set()
    for path, (y,) in flat.items():
      w = int(active_width(path, width))
      assert y.shape[-1] >= w
      assert np.all(np.asarray(y[..., w:]) == 0), f"{'/'.join(path)} leaks beyond width {w}"
      assert np.any(np.asarray(y[..., :w]) != 0), f"{'/'.join(path)} is all zero"
      seen.add(path[0])
    assert seen == {"stem", "head", *plan_blocks}  # every layer was checked
    assert len(flat) == 2 * 2 + sum(6 if s.has_expand else 4 for s in model.block_specs(arch))
  assert len(traces) == 1


# --------------------------------------------------------------------------- residual ties


@pytest.mark.parametrize("name", ["slim_mobilenet_v2_tiny", "slim_mobilenet_v2"])
def test_residual_blocks_share_one_width_per_stage(name):
  model, space = ofajax.models.get(name)
  labels = model.width_groups()
  n_stages = len(model.settings)
  expanding = sum(n for t, _, n, _ in model.settings if t != 1)
  assert len(labels) == space.leaf("width").shape[0] == 1 + n_stages + expanding + 1
  for s in range(n_stages):
    assert sum(label == f"stage{s}_out" for label in labels) == 1
  specs = model.block_specs(space.largest())
  # MobileNetV2's rule (stride 1 and equal widths) at full width: every block but a stage's first.
  assert [s.name for s in specs if s.residual] == [
      s.name for s in specs if not s.name.endswith("_block0")]
  if name == "slim_mobilenet_v2":
    assert sum(s.residual for s in specs) == 10 and len(specs) == 17
  for arch in _archs(space, 20, seed=3):
    for s in model.block_specs(arch):
      if s.residual:
        assert s.in_channels == s.out_channels, (s, space.name(arch))


def test_residual_first_block_joins_input_group():
  # A stem of 8 makes stage 0's first block (t = 1, stride 1, 8 -> 8) residual, as torchvision
  # would: its output has to share the stem's group, or x + y would mix two widths.
  model, space = ofajax.models.get("slim_mobilenet_v2_tiny", stem_base_width=8)
  labels = model.width_groups()
  assert labels[0] == "stem+stage0_out" and "stage0_out" not in labels
  assert len(labels) == 13
  first = model.block_specs(space.largest())[0]
  assert first.residual and first.in_channels == first.out_channels == 8
  x = jax.random.normal(jax.random.key(0), (2, RES, RES, 1))
  variables = _random_variables(model, space, x, seed=2)
  _check_export(model, space, variables, x, _archs(space, 2, seed=4))


# --------------------------------------------------------------------------- validation


def test_validate_names_leaf_and_position(tiny):
  model, space, _, x = tiny
  labels = model.width_groups()
  assert labels[3] == "stage2_out" and model.max_widths()[3] == 24
  good = np.asarray(space.largest()["width"])
  for bad_value, why in [(20, "not a multiple of 8"), (32, "above the group's max"),
                         (0, "zero"), (-8, "negative")]:
    arch = {"width": good.copy()}
    arch["width"][3] = bad_value
    with pytest.raises(ValueError, match=r"'width' at position \(3,\).*\[8, 16, 24\]"):
      space.validate(arch)
  # Below the group's 0.35x minimum: stage3_out (max 32) starts at 16.
  assert labels[4] == "stage3_out"
  arch = {"width": good.copy()}
  arch["width"][4] = 8
  with pytest.raises(ValueError, match=r"'width' at position \(4,\).*\[16, 24, 32\]"):
    space.validate(arch)
  space.validate(space.smallest())
  with pytest.raises(ValueError, match="in_channels=1"):
    model.init(jax.random.key(0), jnp.zeros((1, RES, RES, 3)), space.largest())


# --------------------------------------------------------------------------- counting


def test_cardinality_is_product_of_group_choices():
  model, space = ofajax.models.get("slim_mobilenet_v2_tiny")
  # Max widths per group (stem, stage outs, mids, head) and, by hand, the multiples of 8 from
  # make_divisible(0.35 * C, 8) to C.
  assert model.max_widths() == (16, 8, 16, 24, 32, 48, 48, 96, 96, 144, 144, 192, 192, 128)
  lows = (8, 8, 8, 8, 16, 16, 16, 32, 32, 48, 48, 64, 64, 48)
  counts = [(c - lo) // 8 + 1 for c, lo in zip(model.max_widths(), lows)]
  assert counts == [2, 1, 2, 3, 3, 5, 5, 9, 9, 13, 13, 17, 17, 11]
  for g, (c, lo) in enumerate(zip(model.max_widths(), lows)):
    assert space.allowed_values("width", (g,)) == tuple(range(lo, c + 1, 8))
  assert space.cardinality() == int(np.prod(counts, dtype=object))
  assert np.asarray(space.smallest()["width"]).tolist() == list(lows)
  assert np.asarray(space.largest()["width"]).tolist() == list(model.max_widths())
  full_model, full = ofajax.models.get("slim_mobilenet_v2")
  assert full.cardinality() == int(np.prod(
      [len(full.allowed_values("width", (g,))) for g in range(len(full_model.width_groups()))],
      dtype=object))


def test_full_size_cost_matches_mobilenet_v2_paper():
  # MobileNetV2 1.0 at 224: 300M MACs, 3.4M params (Sandler et al., CVPR 2018, Table 4).
  # torchvision's mobilenet_v2 has exactly 3,504,872 parameters (BN scale / bias included,
  # as OFA counts them); the paper's 3.4M is rounded and its count convention unstated.
  model, space = ofajax.models.get("slim_mobilenet_v2")
  big = cost.count(model, space.largest(), 224)
  assert big["macs"] == 300_774_272
  assert abs(big["macs"] / 300e6 - 1) < 0.01
  assert big["params"] == 3_504_872
  assert abs(big["params"] / 3.4e6 - 1) < 0.04
  # The supernet at its largest arch is exactly MobileNetV2 (kernel 3 only: no transforms).
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                          space.largest())
  assert count_params(shapes["params"]) == 3_504_872
  # The analytic count agrees with the dense export's real parameters (shapes only, no memory).
  for arch in (space.largest(), space.smallest()):
    shapes = jax.eval_shape(model.dense_model(arch).init, jax.random.key(0),
                            jnp.zeros((1, 224, 224, 3)))
    assert count_params(shapes["params"]) == cost.count(model, arch, 224)["params"]
  small = cost.count(model, space.smallest(), 224)
  assert small["macs"] == 48_698_104 and small["params"] == 745_264


@pytest.mark.parametrize("width_mult,macs_m", [(0.5, 97), (0.75, 209), (1.4, 582)])
def test_width_multipliers_match_published_macs(width_mult, macs_m):
  # MobileNetV2 at 224 (tensorflow/models research/slim/nets/mobilenet README table): 97 / 209 /
  # 582 M MACs at width 0.5 / 0.75 / 1.4; the head keeps 1280 channels below width 1.
  model, space = ofajax.models.get("slim_mobilenet_v2", width_mult=width_mult)
  macs = cost.count(model, space.largest(), 224)["macs"]
  assert abs(macs / (macs_m * 1e6) - 1) < 0.01, macs
