"""The recipes as the reference code runs them: each config's phases, sampling and starting
weights, the subnets a step trains, the loss, and what a phase start does."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ofajax import losses, models, phases, starting_weights
from ofajax import optimizer, train_step
from ofajax import train as training


def _config(name, arg=None):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(arg) if arg else module.get_config()


def _phases(config, steps_per_epoch=100):
  _, space = models.get(config.model, **dict(config.model_options))
  return space, [phases.Phase(p, i, space, steps_per_epoch) for i, p in enumerate(config.phases)]


# --------------------------------------------------------------------------- configs


def test_ofa_progressive_shrinking_follows_train_ofa_net():
  config = _config("ofa_mbv3_imagenet")
  _, ps = _phases(config, steps_per_epoch=1)
  assert [(p.name, p.steps, p.learning_rate, p.warmup_steps, p.num_subnets, p.sampling)
          for p in ps] == [("kernel", 120, 0.96, 5, 1, "random"),
                           ("depth1", 25, 0.08, 0, 2, "random"),
                           ("depth2", 120, 0.24, 5, 2, "random"),
                           ("expand1", 25, 0.08, 0, 4, "random"),
                           ("expand2", 120, 0.24, 5, 4, "random")]
  assert [p.sort_channels for p in ps] == [False, False, False, True, True]
  assert [p.expand_stage for p in ps] == [0, 0, 0, 0, 1]  # OFA's expand_ratio_stage
  assert [p.space.allowed_values("expand", (0, 0)) for p in ps] == [(6,), (6,), (6,), (4, 6),
                                                                   (3, 4, 6)]
  assert [p.space.allowed_values("depth", (0,)) for p in ps] == [(4,), (3, 4), (2, 3, 4),
                                                                 (2, 3, 4), (2, 3, 4)]
  assert ps[0].space.allowed_values("kernel", (0, 0)) == (3, 5, 7)
  # The first phase starts from the trained full network, which is also the teacher.
  config.teacher_workdir = "/runs/teacher"
  assert config.init_workdir == "/runs/teacher" and config.distill == "teacher"
  assert config.train_split == "train[:-10000]" and config.holdout == 10000
  assert config.fresh_optimizer


def test_compofa_two_phases_from_the_teacher_without_kernel_transforms():
  config = _config("compofa_mbv3_imagenet")
  space, ps = _phases(config, steps_per_epoch=1)
  assert [(p.steps, p.learning_rate, p.warmup_steps, p.num_subnets, p.sort_channels)
          for p in ps] == [(25, 0.08, 0, 4, True), (120, 0.24, 5, 4, True)]
  assert config.model_options.kernel_transform is False
  config.teacher_workdir = "/runs/teacher"
  assert config.init_workdir == "/runs/teacher"
  assert space.cardinality() < models.get("ofa_mbv3")[1].cardinality()  # the compound space


def test_us_nets_uniform_width_fixed_head_and_recipe():
  config = _config("us_mobilenet_v2_imagenet")
  model, _ = models.get(config.model, **dict(config.model_options))
  space, (phase,) = _phases(config)
  assert phase.sandwich and phase.num_subnets == 4 and phase.uniform == ("width",)
  head = model.width_groups().index("head")
  assert model.group_values()[head] == (1280,)
  assert config.model_options.dropout_rate == 0.0 and config.label_smoothing == 0.0
  assert (config.lr_schedule, config.decay_depthwise, config.weight_decay) == ("linear", False,
                                                                              1e-4)
  assert phase.warmup_steps == 0 and config.learning_rate == 0.5 and config.batch_size == 1024
  # Every random subnet is one multiplier r applied to every group: each width is the multiple
  # of 8 nearest to r x its full width (or the group's narrowest).
  grid = np.linspace(space.lowest_multiplier(["width"]), 1.0, phases.FAMILY_SIZE)
  lows = np.array([v[0] for v in model.group_values()])
  full = np.asarray(model.max_widths())
  for r, arch in zip(grid, phase.family):
    want = np.maximum(r * full, lows)
    want[head] = 1280
    assert np.abs(np.asarray(arch["width"]) - want).max() <= 4, (r, arch["width"])
  assert grid[0] < 0.4 and np.array_equal(phase.family[-1]["width"], full)


def test_autoslim_searches_a_1_5x_supernet_on_50k_held_out():
  config = _config("autoslim_mobilenet_v2_imagenet")
  model, _ = models.get(config.model, **dict(config.model_options))
  assert model.max_widths()[model.width_groups().index("head")] == 1920
  assert config.holdout == 50000 and config.train_split == "train[:-50000]"
  _, (phase,) = _phases(config)
  assert phase.uniform == () and phase.sandwich


def test_dynabert_trains_every_width_then_every_width_and_depth():
  config = _config("dynabert_sst2")
  space, (width, both) = _phases(config)
  assert width.sampling == both.sampling == "all"
  assert width.num_subnets == 4 and both.num_subnets == 12
  assert (width.hidden_scale, both.hidden_scale) == (0.1, 1.0)
  assert config.teacher_ce_weight == 0.0 and config.distill == "teacher"
  heads = [int(np.asarray(a["heads"])[0]) for a in width.family]
  assert heads == [12, 9, 6, 3]
  for arch in both.family:  # the same width in every layer
    assert len(set(np.asarray(arch["heads"]).tolist())) == 1
    assert len(set(np.asarray(arch["ffn"]).tolist())) == 1
  depths = [int(a["depth"]) for a in both.family]
  assert depths == [12] * 4 + [9] * 4 + [6] * 4  # DynaBERT: depth outer, width inner
  assert all(np.array_equal(both.family[0][k], v) for k, v in space.largest().items())


def test_default_holds_out_validation_images():
  config = _config("default")
  assert config.train_split == "train[:-500]" and config.holdout == 500


# --------------------------------------------------------------------------- sampling


def _tiny_bert():
  return models.get("elastic_bert", num_classes=2, vocab_size=32, max_length=8, num_layers=4,
                    hidden_dim=16, num_heads=4, ffn_dim=32, min_heads=1, ffn_step=8,
                    min_ffn_dim=8, depth_choices=(2, 4), depth_rule="spread")


def test_sampling_all_runs_the_family_in_order_inside_jit():
  _, space = _tiny_bert()
  cfg = ml_collections.ConfigDict({"epochs": 1, "learning_rate": 0.1, "sampling": "all",
                                   "uniform": ["heads", "ffn"], "multipliers": [1.0, 0.5]})
  phase = phases.Phase(cfg, 0, space, 10)
  assert phase.num_subnets == 4
  archs = jax.jit(lambda k, d: phases.sample_archs(space, k, d, 4))(jax.random.key(0),
                                                                   phase.as_data())
  got = [(int(archs["depth"][i]), np.asarray(archs["heads"][i]).tolist()) for i in range(4)]
  assert got == [(4, [4] * 4), (4, [2] * 4), (2, [4] * 4), (2, [2] * 4)]


def test_uniform_random_slots_share_one_multiplier_and_sandwich_keeps_the_extremes():
  _, space = _tiny_bert()
  cfg = ml_collections.ConfigDict({"epochs": 1, "learning_rate": 0.1, "sampling": "sandwich",
                                   "num_subnets": 6, "uniform": ["heads"]})
  phase = phases.Phase(cfg, 0, space, 10)
  archs = jax.jit(lambda k, d: phases.sample_archs(space, k, d, 6))(jax.random.key(3),
                                                                   phase.as_data())
  heads = np.asarray(archs["heads"])
  assert (heads.min(1) == heads.max(1)).all()  # one head count in every layer of a subnet
  for k in space.names:
    np.testing.assert_array_equal(archs[k][0], space.largest()[k])
    np.testing.assert_array_equal(archs[k][1], space.smallest()[k])
  ffn = np.asarray(archs["ffn"][2:])
  assert (ffn.min(1) != ffn.max(1)).any()  # not uniform: still sampled per layer


def test_phase_config_errors_are_clear():
  _, space = _tiny_bert()
  base = {"epochs": 1, "learning_rate": 0.1}
  with pytest.raises(ValueError, match="uniform leaves \\['width'\\]"):
    phases.Phase(ml_collections.ConfigDict({**base, "uniform": ["width"]}), 0, space, 10)
  with pytest.raises(ValueError, match="needs 'uniform'"):
    phases.Phase(ml_collections.ConfigDict({**base, "sampling": "all"}), 0, space, 10)
  with pytest.raises(ValueError, match="scalar leaves only"):
    phases.Phase(ml_collections.ConfigDict({**base, "sampling": "all", "uniform": ["heads"],
                                            "multipliers": [1.0]}), 0, space, 10)


# --------------------------------------------------------------------------- the step


def test_inplace_slots_and_loss_inside_the_step():
  """Slot 0 learns from the labels alone; the others from slot 0's logits alone (US-Nets)."""
  config = ml_collections.ConfigDict({"label_smoothing": 0.0, "kd_weight": 1.0,
                                      "kd_temperature": 1.0, "distill": "inplace"})
  opts = train_step.LossOptions.from_config(config)

  def fake_grad_fn(params, adapters, batch_stats, arch, inputs, labels, teacher, ce_weight,
                   kd_on, hidden_scale, key):
    logits = jnp.full((2, 3), 10.0 * (arch["id"] + 1))
    loss = 1000.0 * ce_weight + kd_on * teacher["logits"][0, 0]
    return ((loss, ((logits, None), batch_stats, jnp.float32(0.0))),
            jax.tree.map(jnp.zeros_like, (params, adapters)))

  state = training.TrainState(step=jnp.int32(0), params={"w": jnp.ones(2)}, batch_stats={},
                              opt_state=(), rng=jnp.zeros(2, jnp.uint32))
  phase = {"num_subnets": jnp.int32(3), "hidden_scale": jnp.float32(1.0)}
  archs = {"id": jnp.arange(4)}
  slot = {"logits": jnp.zeros((2, 3))}
  _, _, total, first, _ = train_step.accumulate_subnets(
      fake_grad_fn, opts, state, None, None, archs, jax.random.split(jax.random.key(0), 4),
      phase, None, slot)
  # slot 0: 1000 (labels); slots 1, 2: slot 0's logits (10) each; slot 3 is skipped.
  assert float(first) == 1000.0 and float(total) == 1020.0


def test_subnet_loss_is_cross_entropy_plus_weighted_distillation():
  model, space = _tiny_bert()  # the loss is the same for every model; this one compiles fast
  x = jax.random.randint(jax.random.key(0), (4, 8), 1, 32)
  y = jnp.arange(4) % 2
  variables = {"batch_stats": {}, **models.init(model, jax.random.key(1), x[:1])}
  teacher = {"logits": jax.random.normal(jax.random.key(2), (4, 2))}
  config = ml_collections.ConfigDict({"label_smoothing": 0.1, "kd_weight": 0.7,
                                      "kd_temperature": 2.0, "distill": "teacher"})
  opts = train_step.LossOptions.from_config(config)
  arch = space.smallest()
  loss_fn = jax.jit(lambda v, a: train_step.subnet_loss(
      model, opts, v["params"], {}, v["batch_stats"], a, x, y, teacher, 1.0, 1.0, 1.0,
      jax.random.key(3)))
  loss, ((logits, _), _, _) = loss_fn(variables, arch)
  want = (losses.cross_entropy(logits, y, 0.1)
          + 0.7 * losses.distillation(logits, teacher["logits"], 2.0))
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


# --------------------------------------------------------------------------- phase starts


def test_fresh_optimizer_state_restarts_momentum_but_not_the_schedule():
  schedule = optax.join_schedules([optax.constant_schedule(1.0), optax.constant_schedule(0.5)],
                                  [3])
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(schedule, momentum=0.9))
  params = {"w": jnp.ones(3)}
  state = training.TrainState(step=jnp.int32(0), params=params, batch_stats={},
                              opt_state=tx.init(params), rng=jnp.zeros(2, jnp.uint32))
  for _ in range(4):
    updates, opt_state = tx.update({"w": jnp.ones(3)}, state.opt_state, state.params)
    state = state.replace(opt_state=opt_state)
  fresh = starting_weights.fresh_optimizer_state(tx, state)
  momentum = [s for s in jax.tree.leaves(fresh) if np.shape(s) == (3,)]
  assert momentum and all(np.all(np.asarray(m) == 0) for m in momentum)
  counts = [s.count for s in jax.tree.leaves(
      fresh, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  assert [int(c) for c in counts] == [4]


def test_linear_schedule_decays_to_zero_and_depthwise_decay_can_be_off():
  config = _config("us_mobilenet_v2_imagenet")
  space, ps = _phases(config, steps_per_epoch=2)
  schedule = optimizer.make_schedule(ps, "linear")
  steps = ps[0].steps
  assert float(schedule(0)) == pytest.approx(0.5)
  assert float(schedule(steps // 2)) == pytest.approx(0.25)
  assert float(schedule(steps)) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="lr_schedule"):
    optimizer.make_schedule(ps, "step")
  params = {"stage0": {"depthwise": {"kernel": 1}, "expand": {"kernel": 1, "bias": 1}}}
  assert optimizer.decay_mask(params, depthwise=False) == {
      "stage0": {"depthwise": {"kernel": False}, "expand": {"kernel": True, "bias": False}}}
  assert optimizer.decay_mask(params)["stage0"]["depthwise"]["kernel"] is True


def test_dynabert_layer_mapping():
  # Half depth: the k-th kept layer matches teacher layer 2k (1-based); 9 of 12 as DynaBERT's
  # kept_layers_index = floor(i / 0.75); the last layer always the teacher's last.
  half = np.asarray(losses.teacher_layers(np.array([1, 0] * 6)))
  assert half[::2].tolist() == [1, 3, 5, 7, 9, 11]
  keep = np.array([1, 1, 1, 0] * 3)
  mapped = np.asarray(losses.teacher_layers(keep))[keep == 1]
  assert mapped.tolist() == [0, 1, 3, 4, 5, 7, 8, 9, 11]
  assert np.asarray(losses.teacher_layers(np.ones(12))).tolist() == list(range(12))


# --------------------------------------------------------------------------- starting weights

_TINY = {"num_classes": 10, "depth_choices": (1, 2), "kernel_choices": (3, 5),
         "expand_choices": (2, 3), "execution": "masked"}


def _random_variables(model, space, seed=0):
  """Random variables of the model's shapes, without compiling its init."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.input_spec.sample(8),
                          space.largest())
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype) if s.ndim else
                      np.asarray(1.0, s.dtype), {"params": shapes["params"],
                                                 "batch_stats": shapes["batch_stats"]})


def _state(variables, tx=None):
  tx = tx or optax.sgd(0.1, momentum=0.9)
  return training.TrainState(step=jnp.int32(0), params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             opt_state=tx.init(variables["params"]),
                             rng=jnp.zeros(2, jnp.uint32))


def test_compofa_starts_from_an_ofa_workdir_and_a_misfit_is_named(tmp_path):
  from ofajax.convert.workdir import write_workdir  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  tiny = {"num_classes": 10, "execution": "masked"}  # CompOFA's coupling needs D234 / E346
  source = default.get_config()
  source.model = "ofa_mbv3_tiny"
  source.model_options = ml_collections.ConfigDict(tiny)
  ofa_model, ofa_space = models.get("ofa_mbv3_tiny", **tiny)
  ofa_vars = _random_variables(ofa_model, ofa_space)
  write_workdir(str(tmp_path / "ofa"), source, ofa_vars)

  target = default.get_config()
  target.model = "compofa_mbv3_tiny"
  target.model_options = ml_collections.ConfigDict({**tiny, "kernel_transform": False})
  target.init_workdir = str(tmp_path / "ofa")
  model, space = models.get(target.model, **dict(target.model_options))
  state = starting_weights.init_from_workdir(_state(_random_variables(model, space, 1)), target, False)
  np.testing.assert_array_equal(state.params["classifier"]["kernel"],
                                ofa_vars["params"]["classifier"]["kernel"])
  np.testing.assert_array_equal(state.batch_stats["stem"]["bn"]["mean"],
                                ofa_vars["batch_stats"]["stem"]["bn"]["mean"])

  wider = default.get_config()
  wider.model = "ofa_mbv3_tiny"
  wider.model_options = ml_collections.ConfigDict({**tiny, "expand_choices": (3, 4, 8)})
  wider.init_workdir = str(tmp_path / "ofa")
  model, space = models.get(wider.model, **dict(wider.model_options))
  with pytest.raises(ValueError, match=r"params\['stage0_block0'\]\['depthwise'\]\['kernel'\] "
                     r"has shape \(7, 7, 1, 64\) here, the source has shape \(7, 7, 1, 48\)"):
    starting_weights.init_from_workdir(_state(_random_variables(model, space)), wider, False)


def test_phase_start_sorts_channels_and_restarts_the_optimizer():
  import types  # pylint: disable=g-import-not-at-top
  from ofajax import distributed, importance  # pylint: disable=g-import-not-at-top
  model, space = models.get("ofa_mbv3_tiny", **_TINY)
  variables = _random_variables(model, space)
  tx = optax.sgd(0.1, momentum=0.9)
  state = _state(variables, tx)
  state = state.replace(opt_state=jax.tree.map(jnp.ones_like, state.opt_state))
  cfgs = [{"epochs": 1, "learning_rate": 0.1, "num_subnets": 1, "sampling": "random"},
          {"epochs": 1, "learning_rate": 0.1, "num_subnets": 1, "sampling": "random",
           "sort_channels": True}]
  run = types.SimpleNamespace(
      phases=[phases.Phase(ml_collections.ConfigDict(c), i, space, 4) for i, c in
              enumerate(cfgs)],
      state=state, model=model, tx=tx, config=ml_collections.ConfigDict({}),
      mesh=distributed.make_mesh(1), is_main=False)
  assert training.start_phase(run, 0) is state  # nothing to do at the first phase's start
  started = training.start_phase(run, 1)
  want = importance.sort_channels(model, variables)
  for got, ref, old in zip(jax.tree.leaves(started.params), jax.tree.leaves(want["params"]),
                           jax.tree.leaves(variables["params"])):
    np.testing.assert_array_equal(np.asarray(got), ref)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want["params"]),
                                                      jax.tree.leaves(variables["params"])))
  assert all(np.all(np.asarray(m) == 0) for m in jax.tree.leaves(started.opt_state))


def test_a_training_split_that_reads_the_holdout_is_refused():
  from ofajax.data import splits  # pylint: disable=g-import-not-at-top
  splits.check_holdout("train[:-500]", 500, {"train": 4000})
  splits.check_holdout("train", 0, {"train": 4000})
  with pytest.raises(ValueError, match=r"holdout=500 .* reads them: train on 'train\[:-500\]'"):
    splits.check_holdout("train", 500, {"train": 4000})
  with pytest.raises(ValueError, match="holdout=500"):
    splits.check_holdout("train[:-400]", 500, {"train": 4000})
