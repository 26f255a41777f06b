import tempfile
import zlib

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jcore

# Tests build the same train step / evaluator several times (restarts, bad-input runs); a
# per-session persistent compilation cache turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ofajax-xla-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _seed(path) -> int:
  """A per-leaf seed that is the same in every process: hash(str) is salted (PYTHONHASHSEED)."""
  return zlib.crc32(jax.tree_util.keystr(path).encode()) % (2**31)


def _perturb(variables, key):
  """Random BN statistics and non-identity kernel transforms, so export checks are not trivial."""
  stats_key, param_key = jax.random.split(key)

  def stats(path, x):
    k = jax.random.fold_in(stats_key, _seed(path))
    if path[-1].key == "mean":
      return 0.3 * jax.random.normal(k, x.shape)
    return jax.random.uniform(k, x.shape, minval=0.5, maxval=2.0)

  def params(path, x):
    name = jax.tree_util.keystr(path)
    k = jax.random.fold_in(param_key, _seed(path))
    if "transform_" in name or path[-1].key in ("scale", "bias"):
      return x + 0.1 * jax.random.normal(k, x.shape)
    return x

  out = dict(variables)
  out["batch_stats"] = jax.tree_util.tree_map_with_path(stats, variables["batch_stats"])
  out["params"] = jax.tree_util.tree_map_with_path(params, variables["params"])
  return out


@pytest.fixture
def perturb():
  return _perturb


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def assert_close_trees(a, b, rel):
  """Every leaf of ``b`` within ``rel`` x the largest entry of any leaf of ``a`` (names the
  worst leaf on failure)."""
  scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(a))
  diffs = jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda p, q: float(jnp.max(jnp.abs(p - q))), a, b))
  worst = max(diffs, key=lambda kv: kv[1])
  assert worst[1] <= rel * scale, (jax.tree_util.keystr(worst[0]), worst[1], scale)


def conv_and_dot_flops(fn, *args):
  """XLA cost_analysis flops of every convolution and dot in ``fn``, each compiled alone."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
        yield eqn
      for p in eqn.params.values():
        if isinstance(p, jcore.ClosedJaxpr):
          yield from walk(p.jaxpr)
        elif isinstance(p, jcore.Jaxpr):
          yield from walk(p)
  total, seen = 0.0, {}
  for eqn in walk(jax.make_jaxpr(fn)(*args).jaxpr):
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    # Equal ops (same primitive, shapes and parameters) recur block after block: compile once.
    key = (eqn.primitive.name, tuple((a.shape, str(a.dtype)) for a in avals), str(eqn.params))
    if key not in seen:
      single = jax.jit(lambda *a, e=eqn: e.primitive.bind(*a, **e.params))
      analysis = single.lower(*avals).compile().cost_analysis()
      seen[key] = (analysis if isinstance(analysis, dict) else analysis[0])["flops"]
    total += seen[key]
  return total
