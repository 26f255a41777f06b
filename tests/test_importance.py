"""Head / FFN-neuron importance and re-ordering of the elastic transformer supernets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from ofajax import importance, models

RESOLUTION = {"elastic_vit_tiny": 28, "elastic_bert_tiny": 16}


def _randomised(variables, seed, scale=0.3):
  """Every parameter moved well away from its init (the ViT classifier starts at zero, which
  would make every gradient, hence every importance, zero). NumPy's generator: no compiles."""
  rng = np.random.default_rng(seed)
  move = lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32))
  return {**variables, "params": jax.tree.map(move, variables["params"])}


def _batches(model, resolution, n=2, batch=6):
  rng = np.random.default_rng(100)
  out = []
  for _ in range(n):
    if models.takes_tokens(model):
      x = rng.integers(1, model.vocab_size, (batch, resolution), np.int32)
      x[:, -3:] = model.pad_id   # some padding, which the attention must ignore
    else:
      x = rng.standard_normal((batch, resolution, resolution, model.in_channels), np.float32)
    out.append({"inputs": x, "label": rng.integers(0, model.num_classes, (batch,), np.int32)})
  return out


@pytest.fixture(scope="module", params=sorted(RESOLUTION))
def setup(request):
  name = request.param
  model, space = models.get(name)
  res = RESOLUTION[name]
  variables = models.init(model, jax.random.key(0), models.sample_input(model, res, 2))
  variables = _randomised(variables, 1)
  batches = _batches(model, res)
  forward = jax.jit(lambda v, x: model.apply(v, x, space.largest(), train=False))
  return model, variables, batches, forward


def test_reorder_keeps_the_full_network(setup):
  model, variables, batches, forward = setup
  new, imp = importance.reorder_by_importance(model, variables, batches)
  # The re-ordering really moved something (else the check below would be trivially true).
  head_order, neuron_order = importance.orders(imp)
  assert (head_order != np.arange(model.num_heads)).any()
  assert (neuron_order != np.arange(model.ffn_dim)).any()
  moved = new["params"]["layer0"]["ffn"]["fc1"]["kernel"]
  assert not np.allclose(moved, variables["params"]["layer0"]["ffn"]["fc1"]["kernel"])
  for batch in batches:
    before = forward(variables, batch["inputs"])
    after = forward(new, batch["inputs"])
    assert float(jnp.max(jnp.abs(before))) > 1e-3
    assert rel_err(after, before) <= 1e-5


def test_reordered_importance_is_sorted_and_maps_back(setup):
  model, variables, batches, _ = setup
  before = importance.measure(model, variables, batches)
  for kind, size in (("heads", model.num_heads), ("ffn", model.ffn_dim)):
    assert before[kind].shape == (model.num_layers, size)
    assert before[kind].dtype == np.float32
    assert (before[kind] > 0).all()
    # Not already sorted, so the sortedness below says something about the re-ordering.
    assert (np.diff(before[kind], axis=1) > 0).any()
  new = importance.reorder(model, variables, before)
  after = importance.measure(model, new, batches)
  head_order, neuron_order = importance.orders(before)
  for kind, order in (("heads", head_order), ("ffn", neuron_order)):
    # Unit j after is unit order[j] before, so its importance moved with it ...
    np.testing.assert_allclose(after[kind], np.take_along_axis(before[kind], order, axis=1),
                               rtol=1e-3, atol=1e-7)
    # ... which leaves every layer in descending order, the most important unit first.
    scale = after[kind].max(axis=1, keepdims=True)
    assert (np.diff(after[kind], axis=1) <= 1e-3 * scale).all()
    np.testing.assert_array_equal(order[:, 0], before[kind].argmax(axis=1))
    np.testing.assert_allclose(after[kind][:, 0], before[kind].max(axis=1), rtol=1e-3)


def test_a_dead_head_and_neuron_go_last(setup):
  model, variables, batches, _ = setup
  layer, head, neuron = model.num_layers - 1, 1, 5
  params = jax.tree.map(lambda x: x, variables["params"])   # a copy to edit
  lp = params[f"layer{layer}"]
  lp["attention"]["out"]["kernel"] = lp["attention"]["out"]["kernel"].at[head].set(0.0)
  lp["ffn"]["fc2"]["kernel"] = lp["ffn"]["fc2"]["kernel"].at[neuron].set(0.0)
  dead = {**variables, "params": params}
  new, imp = importance.reorder_by_importance(model, dead, batches)
  assert imp["heads"][layer, head] == 0.0
  assert imp["ffn"][layer, neuron] == 0.0
  assert (np.delete(imp["heads"][layer], head) > 0).all()
  assert (np.delete(imp["ffn"][layer], neuron) > 0).all()
  head_order, neuron_order = importance.orders(imp)
  assert head_order[layer, -1] == head and neuron_order[layer, -1] == neuron
  # The zeroed output rows are now the last head's and the last neuron's.
  out = np.asarray(new["params"][f"layer{layer}"]["attention"]["out"]["kernel"])
  fc2 = np.asarray(new["params"][f"layer{layer}"]["ffn"]["fc2"]["kernel"])
  assert not out[-1].any() and out[:-1].any(axis=(1, 2)).all()
  assert not fc2[-1].any() and fc2[:-1].any(axis=1).all()


def test_errors(setup):
  model, variables, batches, _ = setup
  with pytest.raises(ValueError, match="at least one batch"):
    importance.measure(model, variables, [])
  with pytest.raises(ValueError, match="at least one batch"):
    importance.measure(model, variables, iter(()))
  with pytest.raises(ValueError, match="do not match"):
    importance.reorder(model, variables, {"heads": np.ones((1, 2)), "ffn": np.ones((1, 2))})
  cnn, _ = models.get("ofa_mbv3_tiny")
  with pytest.raises(ValueError, match="not an elastic transformer"):
    importance.measure(cnn, {"params": {"stem": {}}, "batch_stats": {}}, batches)
  with pytest.raises(ValueError, match="not an elastic transformer"):
    importance.reorder(cnn, {"params": {"stem": {}}, "batch_stats": {}},
                       {"heads": np.ones((1, 2)), "ffn": np.ones((1, 2))})
