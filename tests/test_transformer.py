"""Elastic transformers: export equivalence, cardinality, analytic cost against the exported
graph, depth rules, hidden-state distillation, and training + search of a tiny ViT."""

import json
import math
import os

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.search import autoslim
from ofajax import cost, losses, models
from ofajax.layers import transformer
from ofajax import train as training
from ofajax.search.run import run_search
from conftest import rel_err, tiny_config

MODELS = ("elastic_vit_tiny", "elastic_bert_tiny")


def _inputs(model, space, key, batch=3):
  spec = models.input_spec(model, space.resolutions[0], batch)
  if models.takes_tokens(model):
    tokens = jax.random.randint(key, spec.shape, 1, model.vocab_size)
    lengths = jnp.array([spec.shape[1], 5, 2])[:batch]   # padded sequences too
    return jnp.where(jnp.arange(spec.shape[1]) < lengths[:, None], tokens, model.pad_id)
  return jax.random.normal(key, spec.shape)


def _noisy(variables, key):
  """Every parameter moved away from its init (zero classifier, unit LayerNorms)."""
  leaves, tree = jax.tree.flatten(variables["params"])
  keys = jax.random.split(key, len(leaves))
  params = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return {"params": jax.tree.unflatten(tree, params), "batch_stats": {}}


def _dot_macs(fn, *args) -> int:
  """Multiply-adds of every dot_general in ``fn``'s jaxpr: an independent count of a graph."""
  def walk(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        total += walk(sub)
    return total
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("name", MODELS)
def test_export_equals_supernet_for_20_random_archs_and_cost_is_exact(name):
  model, space = models.get(name)
  res = space.resolutions[0]
  x = _inputs(model, space, jax.random.key(1))
  variables = _noisy(models.init(model, jax.random.key(0), x), jax.random.key(2))
  supernet = jax.jit(lambda v, x, a: model.apply(v, x, a))
  traced_cost = jax.jit(lambda a: cost.count(model, a, res))
  archs = [space.largest(), space.smallest()] + [space.sample(jax.random.key(k))
                                                 for k in range(18)]
  one = x[:1]
  for arch in archs:
    dense = model.dense_model(arch)
    dense_vars = model.slice_variables(variables, arch)
    err = rel_err(dense.apply(dense_vars, x), supernet(variables, x, arch))
    assert err <= 1e-5, (space.name(arch), err)
    counted = cost.count(model, arch, res)
    assert counted["params"] == sum(p.size for p in jax.tree.leaves(dense_vars["params"]))
    # The analytic MACs equal the matrix products of the exported graph, one example.
    assert counted["macs"] == _dot_macs(lambda v, x: dense.apply(v, x), dense_vars, one), \
        space.name(arch)
    # Traced cost (search constraints) agrees with the host count.
    traced = traced_cost(arch)
    assert abs(float(traced["macs"]) - counted["macs"]) <= 1e-6 * counted["macs"]
  names = {space.name(a) for a in archs}
  assert len(names) > 15   # the samples really differ


def test_cardinality_is_exact_for_both_depth_rules():
  for name, rule in (("elastic_vit_tiny", "first"), ("elastic_bert_tiny", "spread")):
    model, space = models.get(name, depth_rule=rule)
    per_layer = len(model.head_values()) * len(model.ffn_values())
    assert space.cardinality() == sum(per_layer ** d for d in model.depth_values())
    # Distinct archs are distinct dense subnets, and all of them are enumerated.
    archs = space.enumerate()
    dense = {tuple(model.dense_layers(a)) for a in archs}
    assert len(archs) == len(dense) == space.cardinality()


def test_depth_rules_keep_the_right_layers():
  # DynaBERT: depth multiplier 0.5 of 12 layers drops every other layer (1, 3, ..., 11);
  # 0.75 drops layers 3, 7 and 11.
  table = transformer.depth_table(12, (6, 9, 12), "spread")
  assert np.flatnonzero(~table[0]).tolist() == [1, 3, 5, 7, 9, 11]
  assert np.flatnonzero(~table[1]).tolist() == [3, 7, 11]
  assert table[2].all()
  first = transformer.depth_table(4, (1, 3), "first")
  assert first.tolist() == [[True, False, False, False], [True, True, True, False]]
  with pytest.raises(ValueError, match="depth rule"):
    transformer.depth_table(4, (2,), "last")
  with pytest.raises(ValueError, match=r"depth 5 must be in \[1, 4\]"):
    transformer.depth_table(4, (5,), "first")
  # A spread-rule BERT of depth 1 of 2 runs layer 0 only: its export has that layer.
  model, space = models.get("elastic_bert_tiny", depth_rule="spread")
  arch = space.smallest()
  assert [s.name for s in model.dense_layers(arch)] == ["layer0"]


def test_hidden_state_distillation_loss():
  key = jax.random.key(0)
  h = jax.random.normal(key, (3, 2, 5, 8))
  e = jax.random.normal(jax.random.key(1), (2, 5, 8))
  tokens = jnp.ones((2, 5), bool)
  student = {"layers": h, "embedding": e, "keep": jnp.ones(3), "token_mask": tokens}
  hidden, embed = losses.hidden_state_mse(student, student)
  assert float(hidden) == 0.0 and float(embed) == 0.0
  # A dropped layer and a padding token do not count, whatever they hold.
  noise = jax.random.normal(jax.random.key(2), h.shape)
  changed = h.at[1].set(noise[1]).at[:, :, 4].set(noise[:, :, 4])
  other = dict(student, layers=changed)
  masked = dict(student, keep=jnp.array([1.0, 0.0, 1.0]), token_mask=tokens.at[:, 4].set(False))
  assert float(losses.hidden_state_mse(masked, other)[0]) < 1e-10
  assert float(losses.hidden_state_mse(student, other)[0]) > 0.1
  # KL is zero at the teacher and has the gradient of soft cross-entropy.
  logits = jax.random.normal(key, (4, 10))
  assert abs(float(losses.kl_divergence(logits, logits, 2.0))) < 1e-6
  teacher = jax.random.normal(jax.random.key(3), (4, 10))
  g_kl = jax.grad(losses.kl_divergence)(logits, teacher, 2.0)
  g_ce = jax.grad(losses.distillation)(logits, teacher, 2.0)
  np.testing.assert_allclose(g_kl, g_ce, atol=1e-6)


def vit_config(data_dir, stage, **overrides):
  """A tiny ViT on digits 8x8 in DynaBERT's steps: ``"full"`` trains the full network alone;
  ``"elastic"`` starts from it (re-ordered by importance), then trains width, then width + depth,
  distilled from it (KL on logits + hidden-state + embedding MSE)."""
  c = tiny_config(data_dir)
  c.model = "elastic_vit_tiny"
  c.model_options = ml_collections.ConfigDict({"num_classes": 10, "patch_size": 4,
                                               "resolutions": (8,), "depth_rule": "spread"})
  c.optimizer, c.learning_rate, c.weight_decay = "adamw", 1e-3, 0.01
  base = dict(c.phases[0])
  if stage == "full":
    c.distill = "none"
    c.phases = [ml_collections.ConfigDict(dict(
        base, name="full", epochs=4 / 44, num_subnets=1, sampling="random",
        restrict={"depth": [3], "heads": [4], "ffn": [64]}))]
  else:
    c.kd_loss, c.hidden_mse_weight, c.embedding_mse_weight = "kl", 1.0, 1.0
    c.distill = "teacher"
    c.phases = [ml_collections.ConfigDict(dict(base, name="width", epochs=3 / 44,
                                               restrict={"depth": [3]})),
                ml_collections.ConfigDict(dict(base, name="width_depth", epochs=3 / 44,
                                               restrict={}))]
    c.reorder.enabled = True
  for k, v in overrides.items():
    c[k] = v
  return c


def test_dynabert_steps_train_reorder_distil_evaluate_and_search(tmp_path, data_dir):
  full = str(tmp_path / "full")
  training.train_and_evaluate(vit_config(data_dir, "full"), full)
  workdir = str(tmp_path / "elastic")
  records = training.train_and_evaluate(
      vit_config(data_dir, "elastic", teacher_workdir=full, init_workdir=full), workdir)
  assert [r["name"] for r in records[:2]] == ["largest", "smallest"]
  assert records[0]["macs"] > records[1]["macs"]
  assert all(0.0 <= r["top1"] <= 1.0 for r in records)
  importance = json.load(open(os.path.join(workdir, "importance.json")))
  assert np.asarray(importance["heads"]).shape == (3, 4)
  assert np.asarray(importance["ffn"]).shape == (3, 64)
  assert np.asarray(importance["heads"]).max() > 0
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)

  search = autoslim.get_config()
  # tiny_config holds out the last 200 training digits: validate there
  search.calib_split, search.calib_batches, search.calib_batch_size = "train[:-200]", 1, 32
  search.valid_split, search.valid_batch_size = "train[-200:]", 100
  search.target_fractions = (0.6,)
  search.engine.chunk_size = 4
  result = run_search(search, workdir)
  (chosen,) = result["chosen"]
  assert chosen["macs"] <= chosen["target_macs"]
  assert os.path.exists(os.path.join(chosen["export_dir"], "model.stablehlo"))

  # init_workdir must hold parameters of the same shapes (another depth rule would do).
  other = vit_config(data_dir, "elastic", teacher_workdir=full, init_workdir=full)
  other.model_options.patch_size = 2
  with pytest.raises(ValueError, match="do not fit this run's elastic_vit_tiny.*has shape"):
    training.train_and_evaluate(other, str(tmp_path / "other"))


def test_hidden_distillation_needs_a_fixed_teacher(tmp_path, data_dir):
  for distill, match in (("none", "hidden states from a teacher"), ("inplace", "fixed teacher")):
    with pytest.raises(ValueError, match=match):
      training.train_and_evaluate(vit_config(data_dir, "elastic", distill=distill),
                                  str(tmp_path / distill))
  with pytest.raises(ValueError, match="kd_loss"):
    training.train_and_evaluate(vit_config(data_dir, "full", kd_loss="mse"), str(tmp_path / "y"))


def test_wrong_inputs_are_named():
  model, space = models.get("elastic_bert_tiny")
  variables = models.init(model, jax.random.key(0), models.sample_input(model, 16))
  with pytest.raises(ValueError, match="int token ids"):
    model.apply(variables, jnp.zeros((2, 16)), space.largest())
  vit, vspace = models.get("elastic_vit_tiny")
  vvars = models.init(vit, jax.random.key(0), models.sample_input(vit, 28))
  with pytest.raises(ValueError, match="position embeddings"):
    vit.apply(vvars, jnp.zeros((1, 32, 32, 1)), vspace.largest())
