"""Active-size execution of the elastic transformers (heads and FFN at static width buckets)
equals masked execution: eval logits, every gradient of a train-mode loss (dropout on), head
importance gradients; one compile serves every arch."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ofajax import models
from ofajax.layers import transformer
from conftest import assert_close_trees

# Dropout on, so the test covers active execution drawing the same dropout masks as masked.
# The tiny models' default buckets are every allowed width; the ViT's coarser ones (2 or 4 heads,
# 32 or 64 neurons) make branches mask heads and neurons inside their bucket.
MODELS = {"elastic_vit_tiny": dict(num_layers=2, depth_choices=(1, 2), dropout_rate=0.1,
                                   attention_dropout_rate=0.1, width_buckets=(0.5, 1.0)),
          "elastic_bert_tiny": dict(dropout_rate=0.1, attention_dropout_rate=0.1)}


def _inputs(model, space, batch=3):
  spec = models.input_spec(model, space.resolutions[0], batch)
  if models.takes_tokens(model):   # padded sequences too
    tokens = jax.random.randint(jax.random.key(0), spec.shape, 1, model.vocab_size)
    lengths = jnp.array([spec.shape[1], 5, 2])[:batch]
    return jnp.where(jnp.arange(spec.shape[1]) < lengths[:, None], tokens, model.pad_id)
  return jax.random.normal(jax.random.key(0), spec.shape)


def _compile(fn, *args):
  """``jax.jit(fn)`` compiled for ``args`` with the fast (unoptimised) XLA options: one
  executable serves every arch, and both executions get the same options."""
  return jax.jit(fn).lower(*args).compile(compiler_options=models.FAST_COMPILE)


def _outputs_fn(model):
  """(params, x, arch) -> eval logits and the gradients of a train-mode loss (dropout on)."""
  def outputs(params, x, arch):
    def loss(params):
      logits = model.apply({"params": params}, x, arch, train=True,
                           rngs={"dropout": jax.random.key(7)})
      return jnp.sum(jnp.sin(3.0 * logits))

    return model.apply({"params": params}, x, arch), jax.grad(loss)(params)
  return outputs


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request):
  masked, space = models.get(request.param, **MODELS[request.param])
  x = _inputs(masked, space)
  params = models.init(masked, jax.random.key(1), x)["params"]
  # every parameter away from its init (zero classifier, unit LayerNorms)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  return masked, models.with_execution(masked, "active"), space, x, params


def test_active_matches_masked_logits_and_gradients(setup):
  masked, active, space, x, params = setup
  archs = [space.largest(), space.smallest()] + [space.sample(jax.random.key(i))
                                                for i in range(3)]
  run_masked, run_active = (_compile(_outputs_fn(m), params, x, archs[0])
                             for m in (masked, active))
  for arch in archs:
    logits_m, grads_m = run_masked(params, x, arch)
    logits_a, grads_a = run_active(params, x, arch)
    np.testing.assert_allclose(logits_a, logits_m, rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(logits_m))))
    assert jax.tree.structure(grads_a) == jax.tree.structure(grads_m)
    assert_close_trees(grads_m, grads_a, 1e-5)


def test_active_head_importance_gradients_match_masked(setup):
  masked, active, space, x, params = setup
  scale = jnp.ones((masked.num_layers, masked.num_heads))

  def head_grads(model):
    return lambda arch: jax.grad(lambda s: jnp.sum(jnp.sin(
        model.apply({"params": params}, x, arch, head_scale=s))))(scale)

  arch = space.sample(jax.random.key(4))
  np.testing.assert_allclose(_compile(head_grads(active), arch)(arch),
                             _compile(head_grads(masked), arch)(arch), rtol=1e-5, atol=1e-6)


def test_active_compiles_once_and_switches_over_the_buckets(setup):
  _, active, space, x, params = setup
  traces = []

  @jax.jit
  def forward(arch):
    traces.append(1)   # a Python side effect: runs once per trace
    return active.apply({"params": params}, x, arch)

  for i in range(4):
    forward(space.sample(jax.random.key(20 + i)))
  assert len(traces) == 1
  # one switch per attention and per FFN, with one branch per bucket (inside the depth conds)
  heads, ffn = active.buckets()
  jaxpr = jax.make_jaxpr(forward)(space.largest()).jaxpr
  assert sorted(_branch_counts(jaxpr)) == sorted([len(heads), len(ffn)] * active.num_layers
                                                 + [2] * active.num_layers)


def _branch_counts(jaxpr) -> list[int]:
  """The branch count of every ``cond`` in ``jaxpr``, nested ones included."""
  counts = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      counts.append(len(eqn.params["branches"]))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      counts += _branch_counts(sub)
  return counts


def test_bucket_sizes_round_up_to_allowed_widths():
  bert, _ = models.get("elastic_bert")
  assert bert.buckets() == ((3, 6, 9, 12), (768, 1536, 2304, 3072))
  assert transformer.bucket_sizes((1, 2, 3), (0.25, 0.5, 0.75, 1.0)) == (1, 2, 3)
  assert transformer.bucket_sizes(range(64, 257, 64), (0.3, 0.6)) == (128, 192, 256)
  with pytest.raises(ValueError, match="fractions"):
    transformer.bucket_sizes((1, 2), (0.0, 1.0))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unknown_execution_is_named(name):
  model, space = models.get(name, execution="sliced")
  x = models.sample_input(model, space.resolutions[0], 2)
  with pytest.raises(ValueError, match="execution must be one of"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, space.largest()))
