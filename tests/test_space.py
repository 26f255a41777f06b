"""SearchSpace: cardinality, sampling inside jit, restriction / coupling as data, validation,
host-side edits (random archs, repair after an edit)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ofajax
from ofajax.space import Leaf, SearchSpace


@pytest.fixture(scope="module")
def ofa_space():
  return ofajax.models.get("ofa_mbv3")[1]


@pytest.fixture(scope="module")
def compofa_space():
  return ofajax.models.get("compofa_mbv3")[1]


def test_cardinality_matches_papers(ofa_space, compofa_space):
  # OFA: (9^2 + 9^3 + 9^4)^5 = 7371^5 ~ 2.18e19 subnets per resolution; CompOFA: 3^5 = 243.
  assert ofa_space.cardinality() == (9**2 + 9**3 + 9**4) ** 5 == 7371**5
  assert compofa_space.cardinality() == 243


def test_enumerate_small_space_is_exhaustive_and_distinct(compofa_space):
  archs = compofa_space.enumerate()
  names = {compofa_space.name(a) for a in archs}
  assert len(archs) == len(names) == 243
  for a in archs[:10]:
    compofa_space.validate(a)


def test_largest_and_smallest(ofa_space, compofa_space):
  big, small = ofa_space.largest(), ofa_space.smallest()
  assert np.all(big["depth"] == 4) and np.all(big["kernel"] == 7) and np.all(big["expand"] == 6)
  assert np.all(small["depth"] == 2) and np.all(small["kernel"] == 3) and np.all(small["expand"] == 3)
  csmall = compofa_space.smallest()
  np.testing.assert_array_equal(csmall["kernel"][:, 0], [3, 5, 3, 3, 5])
  assert np.all(csmall["expand"] == 3) and np.all(compofa_space.largest()["expand"] == 6)


def test_sample_inside_jit_vmap_is_valid_and_varied(ofa_space):
  keys = jax.random.split(jax.random.key(0), 64)
  archs = jax.jit(jax.vmap(ofa_space.sample))(keys)
  names = set()
  for i in range(64):
    arch = jax.tree.map(lambda x: x[i], archs)
    ofa_space.validate(arch)
    names.add(ofa_space.name(arch))
  assert len(names) == 64
  # every allowed value shows up somewhere
  assert set(np.unique(archs["kernel"])) == {3, 5, 7}
  assert set(np.unique(archs["depth"])) == {2, 3, 4}


def test_phases_and_coupling_switch_without_recompiling(ofa_space, compofa_space):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def sample_many(tables, key):
    return jax.vmap(lambda k: ofa_space.sample(k, tables))(jax.random.split(key, 32))

  chex.clear_trace_counter()
  phases = [ofa_space.restrict(kernel=[7], depth=[4], expand=[6]),
            ofa_space.restrict(depth=[4], expand=[6]),
            ofa_space.restrict(depth=[3, 4], expand=[6]),
            ofa_space.restrict(expand=[4, 6]),
            ofa_space,
            compofa_space]
  for i, phase in enumerate(phases):
    archs = sample_many(phase.tables(), jax.random.key(i))
    for j in range(32):
      phase.validate(jax.tree.map(lambda x: x[j], archs))
  # first phase is a single subnet
  assert phases[0].cardinality() == 1
  archs = sample_many(compofa_space.tables(), jax.random.key(9))
  mapping = {2: 3, 3: 4, 4: 6}
  for j in range(32):
    for s in range(5):
      d = int(archs["depth"][j, s])
      assert np.all(archs["expand"][j, s, :d] == mapping[d])
      assert np.all(archs["kernel"][j, s, :d] == [3, 5, 3, 3, 5][s])


@pytest.mark.parametrize("leaf,value,match", [
    ("kernel", 4, r"leaf 'kernel' at position \(1, 0\): value 4 is not allowed; allowed values are \[3, 5, 7\]"),
    ("depth", 5, r"leaf 'depth' at position \(1,\): value 5 is not allowed; allowed values are \[2, 3, 4\]"),
    ("expand", 5, r"leaf 'expand' at position \(1, 0\)"),
])
def test_validate_names_leaf_position_value_and_allowed(ofa_space, leaf, value, match):
  arch = {k: np.asarray(v).copy() for k, v in ofa_space.largest().items()}
  arch[leaf][1] = value
  with pytest.raises(ValueError, match=match):
    ofa_space.validate(arch)


def test_validate_rejects_bad_shapes_types_and_keys(ofa_space):
  good = {k: np.asarray(v) for k, v in ofa_space.largest().items()}
  with pytest.raises(ValueError, match=r"'kernel' must have shape \(5, 4\), got \(5, 3\)"):
    ofa_space.validate({**good, "kernel": good["kernel"][:, :3]})
  with pytest.raises(ValueError, match="must hold integers"):
    ofa_space.validate({**good, "depth": good["depth"] + 0.5})
  with pytest.raises(ValueError, match="must hold integers"):
    ofa_space.validate({**good, "depth": np.array(["4"] * 5)})
  with pytest.raises(ValueError, match="missing \\['expand'\\]"):
    ofa_space.validate({"depth": good["depth"], "kernel": good["kernel"]})
  with pytest.raises(ValueError, match="must be a dict"):
    ofa_space.validate([1, 2, 3])
  # integral floats are accepted (JSON from other tools)
  ofa_space.validate({**good, "depth": good["depth"].astype(float)})


def test_validate_ignores_gated_off_positions_but_checks_coupling(ofa_space, compofa_space):
  arch = {k: np.asarray(v).copy() for k, v in ofa_space.smallest().items()}
  arch["kernel"][:, 3] = 99  # depth 2: block 3 never runs
  ofa_space.validate(arch)
  carch = {k: np.asarray(v).copy() for k, v in compofa_space.largest().items()}
  carch["expand"][0, 0] = 3  # depth 4 couples expand to 6
  with pytest.raises(ValueError, match=r"value 3 is not allowed when depth\[0\] = 4"):
    compofa_space.validate(carch)


def test_validate_rejects_traced_archs(ofa_space):
  with pytest.raises(ValueError, match="'depth' is a traced value"):
    jax.jit(lambda arch: ofa_space.validate(arch)["depth"])(ofa_space.largest())


def test_host_edits_draw_and_repair_valid_archs(ofa_space, compofa_space):
  rng = np.random.default_rng(0)
  names = set()
  for _ in range(30):
    arch = compofa_space.random_host(rng)
    compofa_space.validate(arch)
    names.add(compofa_space.name(arch))
  assert len(names) > 10
  arch = compofa_space.to_host(compofa_space.largest())
  assert all(isinstance(v, np.ndarray) and v.dtype == np.int64 for v in arch.values())
  arch["depth"][0] = 2            # CompOFA couples expand 3 to depth 2: expand must follow
  repaired = compofa_space.repair(arch)
  np.testing.assert_array_equal(repaired["expand"][0], [3, 3, 6, 6])  # gated-off: canonical
  assert arch["expand"][0, 0] == 6  # the input is left as it was
  compofa_space.validate(repaired)
  bad = ofa_space.to_host(ofa_space.largest())
  bad["kernel"][0, 0] = 4         # a child takes the largest allowed value below its own
  assert ofa_space.repair(bad)["kernel"][0, 0] == 3
  bad["depth"][0] = 5             # a root leaf has no parent to repair it from: invalid
  assert ofa_space.repair(bad) is None


def test_json_round_trip_name_and_canonical(ofa_space):
  arch = ofa_space.sample(jax.random.key(3))
  back = ofa_space.from_json(ofa_space.to_json(arch))
  for k in arch:
    np.testing.assert_array_equal(arch[k], back[k])
  a = {k: np.asarray(v).copy() for k, v in ofa_space.smallest().items()}
  b = {k: v.copy() for k, v in a.items()}
  b["kernel"][:, 2:] = 5  # differs only at gated-off positions
  assert ofa_space.name(a) == ofa_space.name(b) == "d22222-k33.33.33.33.33-e33.33.33.33.33"
  ca, cb = ofa_space.canonicalize(a), ofa_space.canonicalize(b)
  for k in ca:
    np.testing.assert_array_equal(ca[k], cb[k])
  with pytest.raises(ValueError, match="not valid JSON"):
    ofa_space.from_json("{depth: [")


def test_restrict_and_couple_reject_unknown_values(ofa_space):
  with pytest.raises(ValueError, match=r"values \[9\] are not among \(3, 5, 7\)"):
    ofa_space.restrict(kernel=[9])
  with pytest.raises(ValueError, match="unknown leaf 'width'"):
    ofa_space.restrict(width=[8])
  with pytest.raises(ValueError, match="not a leaf with a parent"):
    ofa_space.couple("depth", {2: 3})


def test_generic_space_counts_per_position_choices():
  space = SearchSpace([Leaf("width", (3,), (8, 16, 24, 32))],
                      allowed={"width": np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)})
  assert space.cardinality() == 2 * 3 * 4
  assert len(space.enumerate()) == 24
  np.testing.assert_array_equal(space.largest()["width"], [16, 24, 32])
  np.testing.assert_array_equal(space.smallest()["width"], [8, 8, 8])
  with pytest.raises(ValueError, match=r"position \(0,\): value 24 is not allowed; allowed values are \[8, 16\]"):
    space.validate({"width": jnp.array([24, 8, 8])})
