"""ofajax.elasticize on models nobody tuned for it (tests/user_models.py): the largest subnet is
the original model, dense subnets equal the masked supernet, costs are exact, sorting keeps the
function, training-mode BatchNorm matches, and bad models get clear errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ofajax
from ofajax import bn, cost, export
from ofajax.elastic import ElasticizeError, describe, sorting
from ofajax.elastic.plan import call_kwargs
from ofajax.models import FAST_COMPILE
from conftest import conv_and_dot_flops, rel_err, tiny_config
from user_models import MODELS

NAMES = sorted(MODELS)


def _random_variables(abstract, seed: int):
  """Seeded random weights of the right shapes (no init compile): BatchNorm statistics off
  their defaults so that every path through a BatchNorm matters."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return (rng.standard_normal(leaf.shape) * 0.3).astype(np.float32)
  return jax.tree_util.tree_map_with_path(one, abstract)


@functools.lru_cache(maxsize=None)
def converted(name):
  """(module, x, user variables, supernet, space, variables, jitted masked forward)."""
  module, shape, skippable = MODELS[name]
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  kwargs = call_kwargs(ofajax.elastic.train_arg_of(module), False)
  abstract = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, **kwargs), x)
  user_variables = _random_variables(abstract, 0)
  supernet, space, variables = ofajax.elasticize(module, x, user_variables, skippable=skippable)
  return module, x, user_variables, supernet, space, variables, jax.jit(supernet.apply)


def _fast_jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


@pytest.mark.parametrize("name", NAMES)
def test_largest_is_the_original_and_one_trace_serves_50_archs(name):
  module, x, user_variables, supernet, space, variables, masked = converted(name)
  kwargs = call_kwargs(supernet.train_arg, False)
  original = _fast_jit(lambda v, x: module.apply(v, x, **kwargs), user_variables, x)
  assert rel_err(masked(variables, x, space.largest()), original) <= 1e-6
  archs = jax.vmap(space.sample)(jax.random.split(jax.random.key(3), 50))
  for i in range(50):
    masked(variables, x, jax.tree.map(lambda a: a[i], archs))
  assert masked._cache_size() == 1


@pytest.mark.parametrize("name", NAMES)
def test_dense_subnets_equal_the_masked_supernet_and_count_exactly(name):
  _, x, _, supernet, space, variables, masked = converted(name)
  archs = [space.smallest()] + [space.sample(jax.random.key(i)) for i in range(19)]
  for arch in archs:
    dense, dense_variables = export.extract_subnet(supernet, variables, arch, space)
    logits = _fast_jit(lambda v, x: dense.apply(v, x), dense_variables, x)
    assert rel_err(logits, masked(variables, x, arch)) <= 1e-5, space.to_json(arch)
    exported = sum(int(np.size(a)) for a in jax.tree.leaves(dense_variables["params"]))
    assert cost.count(supernet, arch, x.shape[1])["params"] == exported


@pytest.mark.parametrize("name", NAMES)
def test_macs_agree_with_xla_cost_analysis(name):
  """XLA counts 2 flops per multiply-add and skips taps that fall on zero padding; the
  analytic count (OFA's convention) counts every tap. Without padding they agree exactly."""
  _, x, _, supernet, space, variables, _ = converted(name)
  arch = space.sample(jax.random.key(11))
  dense, dense_variables = export.extract_subnet(supernet, variables, arch, space)
  xla = conv_and_dot_flops(lambda v, x: dense.apply(v, x), dense_variables, x[:1]) / 2
  macs = cost.count(supernet, arch, x.shape[1])["macs"]
  if name == "mlp":
    assert xla == macs
  else:
    assert 0.7 < xla / macs <= 1.0, (xla, macs)


@pytest.mark.parametrize("name", NAMES)
def test_importance_sorting_keeps_the_full_network(name):
  _, x, _, supernet, space, variables, masked = converted(name)
  variables = jax.device_get(variables)
  sorted_variables = sorting.sort_channels(supernet, variables)
  largest = space.largest()
  assert rel_err(masked(sorted_variables, x, largest), masked(variables, x, largest)) <= 1e-5
  smallest = space.smallest()
  assert rel_err(masked(sorted_variables, x, smallest), masked(variables, x, smallest)) > 1e-3
  # Sorting twice changes nothing more: the first sort left every group in descending order.
  again = sorting.sort_channels(supernet, sorted_variables)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again),
                                                   jax.tree.leaves(sorted_variables)))


def test_groups_follow_residuals_depthwise_concat_and_flatten():
  by_path = lambda name: {l.path: l for l in converted(name)[3].plan().layers}
  resnet = converted("resnet18")[3]
  producers = [g.producers for g in resnet.plan().groups]
  stage1 = next(p for p in producers if "stage1_block0/conv_proj" in p)
  assert set(stage1) == {"stage1_block0/conv_proj", "stage1_block0/Conv_1",
                         "stage1_block1/Conv_1"}
  assert any(set(p) == {"conv_init", "stage0_block0/Conv_1", "stage0_block1/Conv_1"}
             for p in producers)
  assert resnet.plan().groups[by_path("resnet18")[("head",)].out_label[0][0]].fixed_by
  mobilenet = by_path("mobilenet_v2")
  depthwise = mobilenet[("InvertedResidual_1", "Conv_1")]
  assert depthwise.depthwise and depthwise.in_label == depthwise.out_label
  assert depthwise.in_label == mobilenet[("InvertedResidual_1", "Conv_0")].out_label
  unet = by_path("unet")
  assert [s for _, s in unet[("Conv_2",)].in_label] == [8, 8]        # concat: up, e1
  assert len(by_path("vgg")[("Dense_0",)].in_label) == 16            # flatten of 4x4x16
  text = describe(resnet)
  assert "stage1_block0/conv_proj" in text and "keep[2]: stage2_block1" in text


def test_training_mode_batchnorm_matches_the_dense_subnet_and_calibrates():
  _, x, _, supernet, space, variables, _ = converted("resnet18")
  arch = space.sample(jax.random.key(5))
  logits, state = _fast_jit(lambda v, x, a: supernet.apply(
      v, x, a, train=True, mutable=["batch_stats"]), variables, x, arch)
  dense, dense_variables = export.extract_subnet(supernet, variables, arch, space)
  dense_logits, dense_state = _fast_jit(lambda v, x: dense.apply(
      v, x, train=True, mutable=["batch_stats"]), dense_variables, x)
  assert rel_err(logits, dense_logits) <= 1e-5
  updated = supernet.slice_variables({"params": variables["params"], **state}, arch)
  for a, b in zip(jax.tree.leaves(updated["batch_stats"]),
                  jax.tree.leaves(dense_state["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Channels the subnet does not use keep their running statistics.
  site = ("stage0_block0", "BatchNorm_0")   # momentum 0.9
  layer = next(l for l in supernet.plan().layers if l.path == site)
  width = int(supernet.group_widths(arch, np)[layer.out_label[0][0]])
  before = variables["batch_stats"]["net"][site[0]][site[1]]["mean"]
  after = state["batch_stats"]["net"][site[0]][site[1]]["mean"]
  assert width < before.shape[0]
  np.testing.assert_array_equal(after[width:], before[width:])
  # Calibration on one batch gives that batch's moments: the dense subnet's, read back from
  # its running-mean update (new = 0.9 old + 0.1 batch).
  stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], arch)
  calibrated = bn.calibrate_bn(supernet, variables, stacked, x[None], archs_per_call=1)
  assert jax.tree.structure(calibrated) == jax.tree.structure(variables["batch_stats"])
  dense_old = dense_variables["batch_stats"]["net"][site[0]][site[1]]["mean"]
  dense_new = dense_state["batch_stats"]["net"][site[0]][site[1]]["mean"]
  batch_mean = (dense_new - 0.9 * dense_old) / 0.1
  np.testing.assert_allclose(calibrated["net"][site[0]][site[1]]["mean"][0, :width], batch_mean,
                             rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad input


class _Convs(nn.Module):
  """conv -> (something) -> conv -> pool -> dense; ``middle`` is the thing under test."""
  middle: str = "relu"

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    if self.middle == "layer_norm":
      x = nn.LayerNorm()(x)
    elif self.middle == "own_scale":
      x = x * self.param("scale", nn.initializers.ones, (8,))
    elif self.middle == "channel_norm":
      x = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1.0)
    x = nn.relu(nn.Conv(8, (3, 3))(nn.relu(x)))
    return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


class _WidthDependent(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    y = nn.Conv(8, (3, 3))(nn.relu(x))
    if x.shape[-1] != 8:   # decides structure from a channel count: breaks in a subnet
      x = nn.Conv(8, (1, 1), name="proj")(x)
    return nn.Dense(4)(jnp.mean(x + y, axis=(1, 2)))


class _Grow(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(16, (3, 3))(x)


class _Grows(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x)
    x = _Grow(name="grow")(x)
    return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


X = jnp.ones((1, 8, 8, 2))


@pytest.mark.parametrize("middle, match", [
    ("layer_norm", r"LayerNorm_0 \(LayerNorm\).*Conv_0.*frozen=\('Conv_0',\)"),
    ("own_scale", r"parameter \['params'\]\['scale'\].*frozen=\('Conv_0',\)"),
    ("channel_norm", r"'reduce_sum' over the channel axis \(after Conv_0\)"),
])
def test_operations_it_cannot_follow_are_named_and_freezing_fixes_them(middle, match):
  with pytest.raises(ElasticizeError, match=match):
    ofajax.elasticize(_Convs(middle), X)
  _, space, _ = ofajax.elasticize(_Convs(middle), X, frozen=("Conv_0",))
  assert space.leaf("width").shape == (1,)   # Conv_1's group stays elastic


def test_bad_models_and_choices_give_clear_errors():
  with pytest.raises(ElasticizeError, match="decides its structure from channel counts"):
    ofajax.elasticize(_WidthDependent(), X)
  with pytest.raises(ElasticizeError, match="only blocks whose output has their input's shape"):
    ofajax.elasticize(_Grows(), X, skippable=("grow",))
  with pytest.raises(ElasticizeError, match="leaves no channel of Conv_0"):
    ofajax.elasticize(_Convs(), X, widths=(0.05, 1.0), divisor=2)
  with pytest.raises(ElasticizeError, match="frozen layer 'Conv_9' is not a layer"):
    ofajax.elasticize(_Convs(), X, frozen=("Conv_9",))
  with pytest.raises(ElasticizeError, match="'Conv_0' is a single layer"):
    ofajax.elasticize(_Convs(), X, skippable=("Conv_0",))
  with pytest.raises(ElasticizeError, match="skippable block 'nope' is not a module"):
    ofajax.elasticize(_Convs(), X, skippable=("nope",))
  with pytest.raises(ElasticizeError, match="variables\\['params'\\]\\['net'\\]"):
    ofajax.elasticize(_Convs(), X, variables={"params": {}})
  with pytest.raises(ElasticizeError, match="NHWC images"):
    ofajax.elasticize(_Convs(), jnp.ones((2, 8)))
  with pytest.raises(ElasticizeError, match="cannot import 'no_such_pkg.nets'"):
    ofajax.elastic.from_config_options({"factory": "no_such_pkg.nets:resnet"})
  with pytest.raises(ElasticizeError, match="needs config.model_options.factory"):
    ofajax.elastic.from_config_options({"widths": (0.5, 1.0)})


# --------------------------------------------------------------------------- end to end


def _pretrain_digits_cnn(data_dir, steps: int = 150):
  """The user's own training of their plain CNN (optax Adam, their code, not ofajax's)."""
  import optax
  from ofajax import data
  from user_models import DigitsCNN
  source = data.load("digits", "train[:-200]", data_dir)
  batches = data.make_train_iterator(source, batch_size=64, seed=0, dataset="digits")
  module = DigitsCNN()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  tx = optax.adam(3e-3)

  @jax.jit
  def step(variables, opt_state, images, labels):
    def loss(params):
      logits, state = module.apply({**variables, "params": params}, images, train=True,
                                   mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state
    grads, state = jax.grad(loss, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state)
    return {"params": optax.apply_updates(variables["params"], updates), **state}, opt_state

  opt_state = tx.init(variables["params"])
  for _, batch in zip(range(steps), batches):
    variables, opt_state = step(variables, opt_state, batch["inputs"], batch["label"])
  return variables


def test_a_users_cnn_is_elasticized_trained_searched_and_exported(tmp_path, data_dir):
  import flax
  import ml_collections
  from configs.search import autoslim
  from ofajax import train as training
  from ofajax.search.run import run_search
  from test_search import search_config

  weights = str(tmp_path / "digits_cnn.msgpack")
  with open(weights, "wb") as f:
    f.write(flax.serialization.to_bytes(_pretrain_digits_cnn(data_dir)))
  config = tiny_config(data_dir, model="elasticize", num_epochs=24 / 38)
  config.model_options = ml_collections.ConfigDict({
      "factory": "user_models:digits_cnn", "factory_options": {"weights": weights},
      "widths": (0.5, 0.75, 1.0)})
  config.phases[0].sort_channels = True
  config.train_split, config.holdout = "train[:-360]", 360
  workdir = str(tmp_path / "workdir")
  records = {r["name"]: r for r in training.train_and_evaluate(config, workdir)}
  assert records["largest"]["top1"] >= 0.8, records    # it started from the trained CNN
  assert records["smallest"]["macs"] < 0.5 * records["largest"]["macs"]

  result = run_search(search_config(autoslim, target_fractions=(0.6,)), workdir)
  [row] = result["chosen"]
  assert row["macs"] <= row["target_macs"]
  served = export.load_stablehlo(f"{row['export_dir']}/model.stablehlo")
  assert served(jnp.zeros((3, 8, 8, 1))).shape == (3, 10)


def test_an_nnx_model_is_refused_with_the_reason():
  from flax import nnx

  class Small(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 8, (3, 3), rngs=rngs)
      self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))

  with pytest.raises(ElasticizeError, match="NNX modules .* are not supported"):
    ofajax.elasticize(nnx.bridge.ToLinen(Small, args=()), X)


def test_unrolled_subnet_loop_takes_the_same_step_as_the_scan(data_dir):
  """config.subnet_loop="unrolled" (the CPU default for elasticized models) is a different
  program for the same step: same loss, same parameters after it."""
  import ml_collections
  from ofajax import optimizer, train_step
  from ofajax.phases import Phase
  from ofajax.workdir import build_model, init_state

  config = tiny_config(data_dir, model="elasticize")
  config.model_options = ml_collections.ConfigDict({"factory": "user_models:digits_cnn"})
  model, space = build_model(config)
  phase = Phase(config.phases[0], 0, space, 10)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8, 8, 1)), jnp.float32)
  y = jnp.arange(16) % 10
  after = {}
  for loop in ("scan", "unrolled"):
    config.subnet_loop = loop
    state, tx = init_state(model, 0, lambda p: optimizer.make_optimizer(
        config, optimizer.make_schedule([phase]), p), x[:1])
    # A 4th slot beyond the phase's 3 subnets: skipped by the scan, discarded unrolled.
    step = train_step.make_train_step(model, space, config, tx, max_subnets=4)
    after[loop] = step(state, x, y, phase.as_data(), resolution=8)
  (a, ma), (b, mb) = after["scan"], after["unrolled"]
  assert abs(float(ma["loss"]) - float(mb["loss"])) <= 1e-5
  for p, q in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="subnet_loop must be one of"):
    config.subnet_loop = "fast"
    train_step.unroll_subnets(config)


def test_kernel_transforms_bake_into_the_dense_subnet():
  """OFA's transform matrices (identity at start: the largest is still the original model);
  perturbed, a 3x3 subnet differs from a plain centre crop, and the dense subnet still equals
  the masked supernet with exact parameter counts."""
  module, x, user_variables, _, _, _, _ = converted("resnet18")
  supernet, space, variables = ofajax.elasticize(
      module, x, user_variables, skippable=MODELS["resnet18"][2], kernel_transforms=True)
  masked = jax.jit(supernet.apply)
  original = _fast_jit(lambda v, x: module.apply(v, x, train=False), user_variables, x)
  assert rel_err(masked(variables, x, space.largest()), original) <= 1e-6
  rng = np.random.default_rng(4)
  perturbed = jax.tree.map(lambda a: a + 0.5 * rng.standard_normal(a.shape).astype(np.float32),
                           variables["params"]["kernel_transforms"])
  variables = {**variables, "params": {**variables["params"], "kernel_transforms": perturbed}}
  arch = {**space.to_host(space.smallest()), "kernel": np.asarray([3], np.int32)}
  plain = {**variables, "params": {k: v for k, v in variables["params"].items()
                                   if k != "kernel_transforms"}}
  assert rel_err(masked(variables, x, arch), converted("resnet18")[6](plain, x, arch)) > 1e-4
  for arch in [arch, space.sample(jax.random.key(1))]:
    dense, dense_variables = export.extract_subnet(supernet, variables, arch, space)
    assert "kernel_transforms" not in dense_variables["params"]
    logits = _fast_jit(lambda v, x: dense.apply(v, x), dense_variables, x)
    assert rel_err(logits, masked(variables, x, arch)) <= 1e-5
    exported = sum(int(np.size(a)) for a in jax.tree.leaves(dense_variables["params"]))
    assert cost.count(supernet, arch, x.shape[1])["params"] == exported
