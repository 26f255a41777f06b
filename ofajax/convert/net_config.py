"""once-for-all's ``net.config`` of a specialised subnet -> an arch of the matching ofajax space.

OFA publishes each specialised network (``ofa_specialized(net_id)`` in ``ofa/model_zoo.py``) as
``net.config``, the JSON of ``get_active_net_config()``: for MobileNetV3 a ``first_conv``, a list
of ``blocks`` (``ResidualBlock`` with ``conv`` or, in older files, ``mobile_inverted_conv``: an
``MBConvLayer`` with in/out channels, kernel_size, stride, expand_ratio, mid_channels) and the
head; for ResNets an ``input_stem`` (two or three ConvLayers, the middle one a ResidualBlock) and
``ResNetBottleneckBlock``s. Every field is checked against the supernet it should come from, so a
config of another supernet or width fails with the block and field that differ. The input
resolution is in the sibling ``run.config`` (``image_size``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from ofajax.layers import make_divisible
from ofajax.models.ofa_mbv3 import OFAMobileNetV3
from ofajax.models.ofa_resnet50 import OFAResNet50


def read_json(config_or_path) -> dict:
  if isinstance(config_or_path, Mapping):
    return dict(config_or_path)
  with open(config_or_path) as f:
    return json.load(f)


def model_for_net_config(net_config) -> tuple[str, dict]:
  """(registry name, options) of the supernet a ``net.config`` was cut from."""
  config = read_json(net_config)
  name = config.get("name")
  if name == "MobileNetV3":
    stem = int(config["first_conv"]["out_channels"])
    widths = {16: 1.0, 24: 1.2}
    if stem not in widths:
      raise ValueError(f"a MobileNetV3 net.config with a {stem}-channel first conv is from none of "
                       "OFA's published supernets (16: width 1.0, 24: width 1.2)")
    return "ofa_mbv3", {"width_mult": widths[stem]}
  if name == "ResNets":
    return "ofa_resnet50", {}
  raise ValueError(f"net.config of a {name!r} network; supported: 'MobileNetV3' (ofa_mbv3) and "
                   "'ResNets' (ofa_resnet50)")


def _check(where: str, field: str, got, want) -> None:
  if got != want:
    raise ValueError(f"net.config {where}: {field} is {got!r}, the supernet has {want!r}")


def _block_layer(block: Mapping[str, Any]) -> Mapping[str, Any]:
  return block["conv"] if "conv" in block else block["mobile_inverted_conv"]


def _mbv3_arch(model: OFAMobileNetV3, config: Mapping[str, Any]) -> dict:
  widths = model.widths
  _check("first_conv", "out_channels", config["first_conv"]["out_channels"], widths[0])
  blocks = list(config["blocks"])
  first = _block_layer(blocks[0])
  _check("blocks[0]", "out_channels", first["out_channels"], widths[1])
  n_stages, max_depth = model.num_stages, model.max_depth
  depth = np.zeros(n_stages, np.int64)
  kernel = np.full((n_stages, max_depth), max(model.kernel_choices), np.int64)
  expand = np.full((n_stages, max_depth), max(model.expand_choices), np.int64)
  stage, cin = 0, widths[1]
  for b, block in enumerate(blocks[1:], start=1):
    layer, where = _block_layer(block), f"blocks[{b}]"
    # A stage ends where the output width changes (every stage of OFA's MobileNetV3 has its own).
    while stage < n_stages and layer["out_channels"] != widths[stage + 2]:
      stage += 1
    if stage == n_stages:
      raise ValueError(f"net.config {where}: out_channels {layer['out_channels']} is none of the "
                       f"remaining stage widths of the supernet {widths[2:-2]}")
    i = int(depth[stage])
    if i >= max_depth:
      raise ValueError(f"net.config {where}: stage {stage} has more than {max_depth} blocks")
    _check(where, "in_channels", layer["in_channels"], cin)
    _check(where, "stride", layer["stride"], model.strides[stage + 1] if i == 0 else 1)
    _check(where, "act_func", layer["act_func"], model.acts[stage + 1])
    _check(where, "use_se", bool(layer["use_se"]), bool(model.use_se[stage + 1]))
    k, e = int(layer["kernel_size"]), layer["expand_ratio"]
    if k not in model.kernel_choices or e not in model.expand_choices:
      raise ValueError(f"net.config {where}: kernel_size {k} / expand_ratio {e} not among "
                       f"{tuple(model.kernel_choices)} / {tuple(model.expand_choices)}")
    if layer.get("mid_channels") is not None:
      _check(where, "mid_channels", layer["mid_channels"], make_divisible(round(cin * e), 8))
    kernel[stage, i], expand[stage, i], depth[stage] = k, int(e), i + 1
    cin = layer["out_channels"]
  if stage != n_stages - 1 or min(depth) < min(model.depth_choices):
    raise ValueError(f"net.config has {depth.tolist()} blocks per stage; the supernet needs "
                     f"{min(model.depth_choices)} to {max_depth} in each of {n_stages} stages")
  _check("final_expand_layer", "out_channels", config["final_expand_layer"]["out_channels"],
         widths[-2])
  _check("feature_mix_layer", "out_channels", config["feature_mix_layer"]["out_channels"],
         widths[-1])
  return {"depth": depth, "kernel": kernel, "expand": expand}


def _resnet_arch(model: OFAResNet50, config: Mapping[str, Any]) -> dict:
  stem = list(config["input_stem"])
  if len(stem) not in (2, 3):
    raise ValueError(f"net.config input_stem has {len(stem)} layers; OFA-ResNet's has 2 or 3")
  first, last = stem[0], stem[-1]
  width = np.zeros(model.num_stages + 2, np.int64)

  def index(where, channels, options):
    if channels not in options:
      raise ValueError(f"net.config {where}: out_channels {channels} is none of the supernet's "
                       f"{options}")
    return options.index(channels)  # 0.65 and 0.8 give equal stem widths: take the first

  width[0] = index("input_stem[0]", first["out_channels"], model.stem_mid_widths)
  width[1] = index(f"input_stem[{len(stem) - 1}]", last["out_channels"], model.stem_widths)
  depth = np.zeros(model.num_stages, np.int64)
  expand = np.full((model.num_stages, max(model.max_blocks)), max(model.expand_percents), np.int64)
  stage, cin = -1, last["out_channels"]
  for b, block in enumerate(config["blocks"]):
    where = f"blocks[{b}]"
    # OFA starts a stage at each block whose shortcut is not the identity.
    if block["stride"] != 1 or block["in_channels"] != block["out_channels"] or stage < 0:
      stage += 1
      if stage == model.num_stages:
        raise ValueError(f"net.config {where} starts a stage beyond the supernet's "
                         f"{model.num_stages}")
      width[2 + stage] = index(where, block["out_channels"], model.stage_widths(stage))
    i = int(depth[stage])
    if i >= model.max_blocks[stage]:
      raise ValueError(f"net.config {where}: stage {stage} has more than "
                       f"{model.max_blocks[stage]} blocks")
    _check(where, "in_channels", block["in_channels"], cin)
    _check(where, "stride", block["stride"], model.strides[stage] if i == 0 else 1)
    _check(where, "kernel_size", block.get("kernel_size", 3), 3)
    pct = int(round(float(block["expand_ratio"]) * 100))
    if pct not in model.expand_percents:
      raise ValueError(f"net.config {where}: expand_ratio {block['expand_ratio']} not among "
                       f"{tuple(model.expand_ratios)}")
    if block.get("mid_channels") is not None:
      _check(where, "mid_channels", block["mid_channels"],
             make_divisible(round(block["out_channels"] * block["expand_ratio"]), 8))
    expand[stage, i], depth[stage] = pct, i + 1
    cin = block["out_channels"]
  _check("classifier", "in_features", config["classifier"]["in_features"], cin)
  return {"stem_depth": len(stem), "depth": depth, "expand": expand, "width": width}


def arch_from_net_config(net_config, model) -> dict:
  """A validated arch of ``model``'s space for an OFA ``net.config`` (dict or path)."""
  config = read_json(net_config)
  name = config.get("name")
  if isinstance(model, OFAMobileNetV3) and name == "MobileNetV3":
    arch = _mbv3_arch(model, config)
  elif isinstance(model, OFAResNet50) and name == "ResNets":
    arch = _resnet_arch(model, config)
  else:
    raise ValueError(f"a net.config of a {name!r} network does not describe a subnet of "
                     f"{type(model).__name__}")
  return model.search_space().validate(arch)
