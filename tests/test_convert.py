"""Importing once-for-all supernets: state dicts with OFA's real key names and shapes (random
tensors), checked against an independent numpy forward written from OFA's code
(tests/ofa_reference.py); round trips; clear errors; net.config -> arch; the CLI's workdir."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import convert_ofa
import ofa_reference as ref
import ofajax
from configs import ofa_pretrained
from ofajax import cost, optimizer
from ofajax.workdir import Checkpoints, abstract_like, init_state, load_supernet
from ofajax.phases import Phase
from ofajax.convert import net_config, ofa_torch
from ofajax.convert.workdir import write_workdir
from conftest import rel_err
from test_ofa_resnet50 import random_variables, sample_archs


def _compare_with_reference(model, space, variables, x_nchw, reference, n_random=10):
  """Masked supernet (one compile for all archs) vs the numpy reference of OFA's forward."""
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  forward = jax.jit(lambda v, x, a: model.apply(v, x, a, train=False),
                    compiler_options=ofajax.models.FAST_COMPILE)
  archs = [space.largest(), space.smallest()] + sample_archs(space, jax.random.key(0), n_random)
  errors = []
  for arch in archs:
    expected = reference({k: np.asarray(v) for k, v in arch.items()})
    errors.append(rel_err(forward(variables, x, arch), jnp.asarray(expected, jnp.float32)))
    assert errors[-1] <= 1e-4, space.name(arch)
  return archs, errors


@pytest.fixture(scope="module")
def official():
  """Random tensors under once-for-all's key names and shapes, per published supernet."""
  return {"ofa_mbv3_w1.0": ref.ofa_mbv3_state_dict(1.0, np.random.default_rng(0)),
          "ofa_mbv3_w1.2": ref.ofa_mbv3_state_dict(1.2, np.random.default_rng(0)),
          "ofa_resnet50": ref.ofa_resnet50_state_dict(np.random.default_rng(0))}


def test_mbv3_matches_ofa_reference_forward(official):
  model, space = ofajax.models.get("ofa_mbv3")
  sd = official["ofa_mbv3_w1.0"]
  variables = ofa_torch.from_state_dict(sd, model, expected="ofa_mbv3_w1.0")
  x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)

  def reference(arch):  # OFA's set_active_subnet(ks, e, d): one ks / e per block, d per stage
    return ref.ofa_mbv3_forward(sd, x, arch["kernel"].ravel().tolist(),
                                arch["expand"].ravel().tolist(), arch["depth"].tolist(), 1.0)
  archs, _ = _compare_with_reference(model, space, variables, x, reference)
  # kernels 3 and 5 run through the transform matrices (perturbed away from identity here)
  active = {int(k) for a in archs for s in range(5)
            for k in np.asarray(a["kernel"])[s, :int(a["depth"][s])]}
  assert active == {3, 5, 7}


def test_resnet50_matches_ofa_reference_forward(official):
  model, space = ofajax.models.get("ofa_resnet50")
  sd = official["ofa_resnet50"]
  variables = ofa_torch.from_state_dict(sd, model, expected="ofa_resnet50")
  # 24x24: stage 2 sees a 3x3 map, so the ceil-mode average pool of its shortcut is exercised.
  x = np.random.default_rng(1).normal(size=(2, 3, 24, 24)).astype(np.float32)

  def reference(arch):  # OFA's set_active_subnet(d, e, w), written out independently
    d = [2 if arch["stem_depth"] == 3 else 0] + [
        int(n) - b for n, b in zip(arch["depth"], ref.R50_BASE_DEPTHS)]
    e = [arch["expand"][s, i] / 100 for s, b in enumerate(ref.R50_BASE_DEPTHS) for i in range(b + 2)]
    return ref.ofa_resnet50_forward(sd, x, d, e, arch["width"].tolist())
  archs, _ = _compare_with_reference(model, space, variables, x, reference)
  assert {int(a["stem_depth"]) for a in archs} == {2, 3}


@pytest.mark.parametrize("published", ["ofa_mbv3_w1.0", "ofa_mbv3_w1.2", "ofa_resnet50"])
def test_round_trip_and_key_layout(published, official):
  """ofajax -> state dict -> ofajax is the identity, and the state dict has exactly the keys and
  shapes of OFA's modules (as the reference lists them independently)."""
  name, options = ofa_torch.PUBLISHED[published]
  model, _ = ofajax.models.get(name, **options)
  variables = random_variables(model, jnp.zeros((1, 32, 32, 3)), 3)
  sd = ofa_torch.to_state_dict(variables, model)
  assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in official[published].items()}
  back = ofa_torch.from_state_dict(sd, model, expected=published)
  jax.tree.map(np.testing.assert_array_equal, back, variables)


def _legacy_spellings(sd):
  """Older once-for-all files: 'mobile_inverted_conv', unwrapped elastic layers, 'module.'."""
  out = {}
  for k, v in sd.items():
    k = k.replace(".conv.inverted_bottleneck.", ".mobile_inverted_conv.inverted_bottleneck.")
    k = k.replace(".conv.depth_conv.", ".mobile_inverted_conv.depth_conv.")
    k = k.replace(".conv.point_linear.", ".mobile_inverted_conv.point_linear.")
    k = k.replace(".bn.bn.", ".bn.").replace(".conv.conv.weight", ".conv.weight")
    k = k.replace("classifier.linear.linear.", "classifier.linear.")
    out["module." + k] = v
  return out


@pytest.mark.parametrize("published", ["ofa_mbv3_w1.0", "ofa_resnet50"])
def test_legacy_key_spellings_give_the_same_variables(published, official):
  name, options = ofa_torch.PUBLISHED[published]
  model, _ = ofajax.models.get(name, **options)
  sd = official[published]
  legacy = _legacy_spellings(sd)
  assert set(legacy).isdisjoint(sd)
  assert any("mobile_inverted_conv" in k for k in legacy) == published.startswith("ofa_mbv3")
  jax.tree.map(np.testing.assert_array_equal, ofa_torch.from_state_dict(legacy, model),
               ofa_torch.from_state_dict(sd, model))


@pytest.fixture(scope="module")
def tiny_mbv3():
  model, _ = ofajax.models.get("ofa_mbv3_tiny")
  sd = ofa_torch.to_state_dict(random_variables(model, jnp.zeros((1, 28, 28, 1)), 0), model)
  return model, sd


def test_unexpected_missing_and_misshapen_keys_are_named(tiny_mbv3):
  model, sd = tiny_mbv3
  bad = dict(sd)
  bad["blocks.3.conv.depth_conv.extra.weight"] = np.zeros(3)
  del bad["blocks.2.conv.point_linear.bn.bn.running_var"]
  bad["blocks.1.conv.inverted_bottleneck.conv.conv.weight"] = np.zeros((48, 9, 1, 1))
  with pytest.raises(ofa_torch.StateDictError) as info:
    ofa_torch.from_state_dict(bad, model)
  message = str(info.value)
  assert "1 unexpected keys: blocks.3.conv.depth_conv.extra.weight" in message
  assert "1 missing keys: blocks.2.conv.point_linear.bn.bn.running_var" in message
  assert ("blocks.1.conv.inverted_bottleneck.conv.conv.weight: expected (48, 8, 1, 1), "
          "got (48, 9, 1, 1)") in message
  both = dict(sd, **{"blocks.1.mobile_inverted_conv.depth_conv.conv.7to5_matrix": np.eye(25)})
  with pytest.raises(ofa_torch.StateDictError, match="both present"):
    ofa_torch.from_state_dict(both, model)


def test_wrong_model_is_named():
  mbv3, _ = ofajax.models.get("ofa_mbv3")
  resnet_sd = {"input_stem.0.conv.conv.weight": np.zeros((32, 3, 3, 3))}
  with pytest.raises(ofa_torch.StateDictError, match="holds the ofa_resnet50 supernet, not "
                     "ofa_mbv3_w1.0; convert it with --model ofa_resnet50"):
    ofa_torch.from_state_dict(resnet_sd, mbv3, expected="ofa_mbv3_w1.0")
  wide = {"first_conv.conv.weight": np.zeros((24, 3, 3, 3))}
  with pytest.raises(ofa_torch.StateDictError, match="holds the ofa_mbv3_w1.2 supernet"):
    ofa_torch.from_state_dict(wide, mbv3, expected="ofa_mbv3_w1.0")
  with pytest.raises(ValueError, match="no once-for-all state-dict layout for SlimMobileNetV2"):
    ofa_torch.key_table(ofajax.models.get("slim_mobilenet_v2_tiny")[0])


def test_reading_a_torch_file_without_torch_says_how_to_get_it(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  with pytest.raises(ImportError, match="needs torch \\(used only to read the file\\)"):
    ofa_torch.load_state_dict(str(tmp_path / "ofa_mbv3_d234_e346_k357_w1.0"))


# ----------------------------------------------------------------------------- net.config

# Blocks of two published specialised subnets (han-cai/files, ofa/ofa_specialized/*/net.config):
# (in, out, kernel, stride, expand, mid); the first block has expand ratio 1.
FLOPS_595M = dict(stem=24, head=1152, mix=1536, blocks=[
    (24, 24, 3, 1, 1, None), (24, 32, 3, 2, 3, 72), (32, 32, 5, 1, 4, 128), (32, 32, 3, 1, 3, 96),
    (32, 48, 5, 2, 4, 128), (48, 48, 5, 1, 4, 192), (48, 48, 3, 1, 6, 288), (48, 48, 5, 1, 3, 144),
    (48, 96, 7, 2, 6, 288), (96, 96, 5, 1, 6, 576), (96, 96, 3, 1, 3, 288), (96, 96, 5, 1, 4, 384),
    (96, 136, 3, 1, 6, 576), (136, 136, 5, 1, 6, 816), (136, 136, 7, 1, 6, 816),
    (136, 136, 3, 1, 4, 544), (136, 192, 3, 2, 6, 816), (192, 192, 3, 1, 6, 1152),
    (192, 192, 5, 1, 6, 1152), (192, 192, 3, 1, 3, 576)])
NOTE10_22MS = dict(stem=16, head=960, mix=1280, blocks=[
    (16, 16, 3, 1, 1, None), (16, 24, 3, 2, 3, 48), (24, 24, 3, 1, 3, 72), (24, 40, 5, 2, 3, 72),
    (40, 40, 3, 1, 4, 160), (40, 40, 3, 1, 4, 160), (40, 80, 7, 2, 4, 160), (80, 80, 5, 1, 4, 320),
    (80, 80, 5, 1, 4, 320), (80, 112, 5, 1, 4, 320), (112, 112, 3, 1, 6, 672),
    (112, 112, 3, 1, 4, 448), (112, 160, 3, 2, 6, 672), (160, 160, 3, 1, 6, 960),
    (160, 160, 3, 1, 6, 960), (160, 160, 3, 1, 3, 480)])
STAGE_ACT = {16: "relu", 24: "relu", 32: "relu", 40: "relu", 48: "relu"}
SE_WIDTHS = {40, 48, 112, 136, 160, 192}


def mbv3_net_config(spec) -> dict:
  """The JSON OFA's MobileNetV3.config writes (``MobileInvertedResidualBlock`` /
  ``MBInvertedConvLayer`` / ``IdentityLayer`` as in the published files)."""
  def conv_layer(cin, cout, k, stride, act, use_bn=True):
    return {"name": "ConvLayer", "kernel_size": k, "stride": stride, "dilation": 1, "groups": 1,
            "bias": False, "has_shuffle": False, "in_channels": cin, "out_channels": cout,
            "use_bn": use_bn, "act_func": act, "dropout_rate": 0, "ops_order": "weight_bn_act"}
  blocks = []
  for cin, cout, k, s, e, mid in spec["blocks"]:
    shortcut = None if s != 1 or cin != cout else {
        "name": "IdentityLayer", "in_channels": [cin], "out_channels": [cout], "use_bn": False,
        "act_func": None, "dropout_rate": 0, "ops_order": "weight_bn_act"}
    blocks.append({"name": "MobileInvertedResidualBlock", "mobile_inverted_conv": {
        "name": "MBInvertedConvLayer", "in_channels": cin, "out_channels": cout, "kernel_size": k,
        "stride": s, "expand_ratio": e, "mid_channels": mid,
        "act_func": STAGE_ACT.get(cout, "h_swish"), "use_se": cout in SE_WIDTHS},
        "shortcut": shortcut})
  last = spec["blocks"][-1][1]
  return {"name": "MobileNetV3", "bn": {"momentum": 0.1, "eps": 1e-05},
          "first_conv": conv_layer(3, spec["stem"], 3, 2, "h_swish"), "blocks": blocks,
          "final_expand_layer": conv_layer(last, spec["head"], 1, 1, "h_swish"),
          "feature_mix_layer": conv_layer(spec["head"], spec["mix"], 1, 1, "h_swish", False),
          "classifier": {"name": "LinearLayer", "in_features": spec["mix"], "out_features": 1000,
                         "bias": True, "use_bn": False, "act_func": None, "dropout_rate": 0.1,
                         "ops_order": "weight_bn_act"}}


def test_mbv3_net_config_to_arch_and_ofa_reported_cost():
  """OFA's README: flops@595M_top1@80.0 (run.config image_size 236) has 595M MACs and 9.1M
  params; note10_lat@22ms_top1@76.6 (224) 237M MACs and 5.9M params."""
  config = mbv3_net_config(FLOPS_595M)
  assert net_config.model_for_net_config(config) == ("ofa_mbv3", {"width_mult": 1.2})
  model, space = ofajax.models.get("ofa_mbv3", width_mult=1.2)
  arch = net_config.arch_from_net_config(config, model)
  assert space.name(arch) == "d34444-k353.5535.7535.3573.3353-e343.4463.6634.6664.6663"
  c = cost.count(model, arch, 236)
  assert abs(c["macs"] - 595e6) < 0.5e6 and abs(c["params"] - 9.1e6) < 0.05e6
  model, space = ofajax.models.get("ofa_mbv3")
  arch = net_config.arch_from_net_config(mbv3_net_config(NOTE10_22MS), model)
  assert space.name(arch) == "d23334-k33.533.755.533.3333-e33.344.444.464.6663"
  c = cost.count(model, arch, 224)
  assert abs(c["macs"] - 237e6) < 0.5e6 and abs(c["params"] - 5.9e6) < 0.05e6
  with pytest.raises(ValueError, match="first_conv: out_channels is 24, the supernet has 16"):
    net_config.arch_from_net_config(config, model)
  broken = mbv3_net_config(NOTE10_22MS)
  broken["blocks"][5]["mobile_inverted_conv"]["kernel_size"] = 9
  with pytest.raises(ValueError, match="blocks\\[5\\]: kernel_size 9"):
    net_config.arch_from_net_config(broken, model)


def resnet_net_config(model, arch) -> dict:
  """The JSON OFAResNets.get_active_net_config writes for ``arch`` (written out by hand)."""
  arch = {k: np.asarray(v) for k, v in arch.items()}
  mid_widths, stem_widths = [24, 24, 32], [40, 48, 64]
  c0, c1 = mid_widths[arch["width"][0]], stem_widths[arch["width"][1]]
  conv = lambda cin, cout, s: {"name": "ConvLayer", "in_channels": cin, "out_channels": cout,
                               "kernel_size": 3, "stride": s, "use_bn": True, "act_func": "relu"}
  stem = [conv(3, c0, 2)] + [{"name": "ResidualBlock", "conv": conv(c0, c0, 1),
                              "shortcut": None}] * int(arch["stem_depth"] == 3) + [conv(c0, c1, 1)]
  blocks, cin = [], c1
  for s in range(4):
    cout = model.stage_widths(s)[arch["width"][2 + s]]
    for i in range(int(arch["depth"][s])):
      e = arch["expand"][s, i] / 100
      blocks.append({"name": "ResNetBottleneckBlock", "in_channels": cin, "out_channels": cout,
                     "kernel_size": 3, "stride": (1, 2, 2, 2)[s] if i == 0 else 1,
                     "expand_ratio": e, "mid_channels": ref.make_divisible(round(cout * e)),
                     "act_func": "relu", "groups": 1, "downsample_mode": "avgpool_conv"})
      cin = cout
  return {"name": "ResNets", "bn": {"momentum": 0.1, "eps": 1e-05}, "input_stem": stem,
          "blocks": blocks, "classifier": {"name": "LinearLayer", "in_features": cin,
                                           "out_features": 1000, "bias": True}}


def test_resnet_net_config_to_arch():
  model, space = ofajax.models.get("ofa_resnet50")
  assert net_config.model_for_net_config({"name": "ResNets"}) == ("ofa_resnet50", {})
  for arch in [space.largest(), space.smallest()] + sample_archs(space, jax.random.key(8), 3):
    width = np.array(arch["width"])
    width[0] = 0 if width[0] == 1 else width[0]  # 0.65 and 0.8 both give a 24-channel stem
    arch = dict(arch, width=width)
    got = net_config.arch_from_net_config(resnet_net_config(model, arch), model)
    assert space.name(got) == space.name(space.canonicalize(arch))
  bad = resnet_net_config(model, space.largest())
  bad["blocks"][2]["mid_channels"] = 64
  with pytest.raises(ValueError, match="blocks\\[2\\]: mid_channels is 64, the supernet has 88"):
    net_config.arch_from_net_config(bad, model)


# ----------------------------------------------------------------------------- CLI / workdir


def test_cli_writes_a_workdir_train_py_restores(tmp_path, monkeypatch, official):
  sd = official["ofa_mbv3_w1.0"]
  path, workdir = str(tmp_path / "ofa_mbv3_w1.0.npz"), str(tmp_path / "imported")
  np.savez(path, **sd)
  argv = ["convert_ofa.py", f"--checkpoint={path}", "--model=ofa_mbv3_d234_e346_k357_w1.0",
          f"--workdir={workdir}"]
  try:
    flags.FLAGS(argv)
    convert_ofa.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  config = ofa_pretrained.get_config("ofa_mbv3_w1.0")
  with open(f"{workdir}/config.json") as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())
  expected = ofa_torch.from_state_dict(sd, ofajax.models.get("ofa_mbv3")[0])
  with pytest.raises(FileExistsError, match="already holds checkpoint 1"):
    write_workdir(workdir, config, expected)
  # Restore exactly as train.py does: init_state's structure (its init replaced by shapes, to
  # skip a compile), then Checkpoints.restore into it.
  model, space = ofajax.models.get(config.model, **dict(config.model_options))
  monkeypatch.setattr(ofajax.models, "init", lambda m, key, x: jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(m.init, key, x, space.largest())))
  phases = [Phase(p, i, space, 625) for i, p in enumerate(config.phases)]
  state, _ = init_state(model, config.seed, lambda p: optimizer.make_optimizer(
      config, optimizer.make_schedule(phases), p), jnp.zeros((1, 224, 224, 3)))
  ckpt = Checkpoints(workdir)
  restored, meta = ckpt.restore(abstract_like(state))
  ckpt.close()
  assert int(restored.step) == sum(p.steps for p in phases) == meta["step"]
  jax.tree.map(np.testing.assert_array_equal, restored.params, expected["params"])
  jax.tree.map(np.testing.assert_array_equal, restored.batch_stats, expected["batch_stats"])
  # search.py reads the imported workdir like a trained one
  supernet = load_supernet(workdir)
  assert supernet.step == int(restored.step) and supernet.model_name == "ofa_mbv3"
  jax.tree.map(np.testing.assert_array_equal, supernet.variables["params"], expected["params"])
