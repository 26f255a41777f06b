"""Every registered supernet keeps the contract of ofajax.models.base: it is a Supernet, its
input_spec makes inputs that init / apply accept, and its dense twin takes the same inputs and
exactly the variables slice_variables makes. Shapes only (jax.eval_shape): nothing compiles."""

import jax
import jax.numpy as jnp
import pytest

from ofajax import cost, models
from ofajax.models.base import InputSpec, Supernet

TINY = [n for n in models.names() if n.endswith("_tiny")]


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_is_a_supernet(name):
  model, space = models.get(name)
  assert isinstance(model, Supernet)
  assert isinstance(model.input_spec, InputSpec) and model.num_classes > 0
  assert models.takes_tokens(model) == (model.input_spec.kind == "tokens")
  assert space.resolutions


@pytest.mark.parametrize("name", TINY)
def test_input_spec_sample_is_accepted_and_dense_twin_matches(name):
  model, space = models.get(name)
  resolution = space.resolutions[0]
  x = model.input_spec.sample(resolution, batch=2)
  assert jax.eval_shape(lambda: x) == models.input_spec(model, resolution, 2)
  largest, smallest = space.largest(), space.to_host(space.smallest())
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, largest))
  logits = jax.eval_shape(lambda v: model.apply(v, x, smallest, train=False), variables)
  assert logits.shape == (2, model.num_classes)
  dense = model.dense_model(smallest)
  assert dense.input_spec == model.input_spec
  dense_variables = jax.eval_shape(lambda: dense.init(jax.random.key(0), x, train=False))
  sliced = jax.eval_shape(lambda v: model.slice_variables(v, smallest), variables)
  assert _shapes(sliced["params"]) == _shapes(dense_variables["params"])
  assert _shapes(sliced["batch_stats"]) == _shapes(dict(dense_variables).get("batch_stats", {}))
  counted = cost.count(model, smallest, resolution)
  assert counted["macs"] > 0 and counted["params"] > 0


def test_input_spec_shapes_and_errors():
  image, tokens = InputSpec("image", channels=3), InputSpec("tokens", vocab_size=10)
  assert image.struct(32, 4) == jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
  assert tokens.struct(16) == jax.ShapeDtypeStruct((1, 16), jnp.int32)
  assert tokens.sample(5, 2).dtype == jnp.int32 and int(tokens.sample(5, 2).min()) == 1
  with pytest.raises(ValueError, match="input kind"):
    InputSpec("audio")
