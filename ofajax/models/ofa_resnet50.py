"""OFA-ResNet50 supernet (Cai et al., ICLR 2020; released as ``ofa_resnet50`` in once-for-all).

Structure as OFA's ``OFAResNets(depth_list=[0, 1, 2], expand_ratio_list=[0.2, 0.25, 0.35],
width_mult_list=[0.65, 0.8, 1.0])`` defines it (``ofa/imagenet_classification/elastic_nn/
networks/ofa_resnets.py``, ``ofa/model_zoo.py``), a ResNet-50-D design space:

* stem: 3x3 stride-2 conv to ``make_divisible(c // 2, 8)`` channels, an optional residual 3x3
  conv at that width, a 3x3 conv to ``c = make_divisible(64 * w, 8)``; 3x3 stride-2 max pool.
* four stages of bottlenecks with output widths ``make_divisible(256/512/1024/2048 * w, 8)``,
  strides 1/2/2/2 and ``base + d`` blocks, base depths 2/2/4/2 and ``d`` in {0, 1, 2}: the
  *last* blocks of a stage are the ones dropped. The first block of each stage has an avg-pool +
  1x1 conv shortcut; the others are identity shortcuts.
* every block has its own expand ratio e in {0.2, 0.25, 0.35}: middle width
  ``make_divisible(round(out * e), 8)`` of the block's active output width.
* width multipliers are picked per group: the stem's first two convs, the stem's last conv, and
  each stage.

The arch (int32 leaves, larger value = larger net, as every ofajax space):

* ``stem_depth``: int32[] in {2, 3}: 3 runs the optional residual stem conv. OFA's ``d[0]``
  (2 -> runs, 0 -> skipped; sampled from {0, 2}).
* ``depth``: int32[4], blocks per stage: {2, 3, 4} for stages 0, 1, 3 and {4, 5, 6} for stage 2
  (OFA's ``d[1:]`` plus the base depths).
* ``expand``: int32[4, 6], expand ratio in percent {20, 25, 35} of block i of stage s (gated by
  ``depth``; positions beyond a stage's 4 blocks never run). OFA's ``e`` is the flat list over
  the 4 + 4 + 6 + 4 = 18 blocks.
* ``width``: int32[6], OFA's ``w``: an index into (0.65, 0.8, 1.0) for [stem conv 1 and 2,
  stem conv 3, stage 0, 1, 2, 3]. Indices 0 and 1 of the first group both give 24 channels, so
  the cardinality counts some networks twice, exactly as OFA's encoding does.

:func:`to_ofa_arch` / :func:`from_ofa_arch` translate to and from OFA's ``{"d", "e", "w"}``.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofajax import layers
from ofajax.layers import ElasticConvBN, make_divisible
from ofajax.layers.branching import cheapest_first
from ofajax.layers.gating import gated
from ofajax.layers.resnet import (BottleneckSpec, ElasticBottleneck, ElasticResidualConv,
                                  max_pool_3x3_s2)
from ofajax.layers.stats import with_stats
from ofajax.models.base import InputSpec, check_channels, check_execution
from ofajax.models.resnet import ResNet, resnet_cost
from ofajax.space import Leaf, SearchSpace


def _choice_table(index, keys: Sequence[int], table):
  """``table[i][j]`` for ``index = (i_value, j_value)`` over integer keys, without branching
  (works for traced ints, traced floats from ``cost.count`` and numpy ints)."""
  i_value, j_value = index
  rows = [layers.lookup(j_value, keys[1], row) for row in table]
  xp = jnp if any(isinstance(v, jax.Array) for v in (i_value, j_value)) else np
  return sum(xp.where(xp.asarray(i_value) == k, r, 0) for k, r in zip(keys[0], rows))


class OFAResNet50(nn.Module):
  """Elastic ResNet-50-D; ``apply(variables, x, arch, train=...)``."""
  num_classes: int = 1000
  stem_width: int = 64
  base_widths: Sequence[int] = (256, 512, 1024, 2048)
  base_depths: Sequence[int] = (2, 2, 4, 2)
  strides: Sequence[int] = (1, 2, 2, 2)
  width_mults: Sequence[float] = (0.65, 0.8, 1.0)
  expand_ratios: Sequence[float] = (0.2, 0.25, 0.35)
  extra_depths: Sequence[int] = (0, 1, 2)
  in_channels: int = 3
  dropout_rate: float = 0.0
  # OFA-ResNet50 is trained at 128-224 (once-for-all README); its accuracy predictor's sizes.
  resolutions: Sequence[int] = (128, 144, 160, 176, 192, 224)
  execution: str = "masked"   # or "active": see ofajax.layers.branching
  executions: ClassVar[tuple[str, ...]] = ("masked", "active")
  # Active execution's block branches: "width_expand" (one per width multiplier and expand
  # ratio) or "width" (one per width multiplier; the middle width at its largest expand ratio,
  # the rest masked). Measured (bench_train_step, res 96, batch 8): "width_expand" made the
  # smallest step 1.7x and the sandwich 1.16x faster than "width", compiling ~2x longer.
  active_branches: str = "width_expand"

  @property
  def input_spec(self) -> InputSpec:
    return InputSpec("image", channels=self.in_channels)

  # ------------------------------------------------------------------ static structure
  @property
  def stem_widths(self) -> list[int]:
    return [make_divisible(self.stem_width * w, 8) for w in self.width_mults]

  @property
  def stem_mid_widths(self) -> list[int]:
    return [make_divisible(c // 2, 8) for c in self.stem_widths]

  def stage_widths(self, s: int) -> list[int]:
    return [make_divisible(self.base_widths[s] * w, 8) for w in self.width_mults]

  @property
  def expand_percents(self) -> tuple[int, ...]:
    return tuple(int(round(e * 100)) for e in self.expand_ratios)

  @property
  def num_stages(self) -> int:
    return len(self.base_depths)

  @property
  def max_blocks(self) -> list[int]:
    return [b + max(self.extra_depths) for b in self.base_depths]

  def mid_table(self, s: int) -> list[list[int]]:
    """[width index][expand index] -> middle width, with OFA's float formula (host ints)."""
    return [[make_divisible(round(c * e), 8) for e in self.expand_ratios]
            for c in self.stage_widths(s)]

  def _blocks(self):
    """Yields (stage, index, max in, max mid, max out, stride, downsample) per block."""
    cin = max(self.stem_widths)
    for s in range(self.num_stages):
      cout = max(self.stage_widths(s))
      for i in range(self.max_blocks[s]):
        stride = self.strides[s] if i == 0 else 1
        yield s, i, cin, max(max(r) for r in self.mid_table(s)), cout, stride, i == 0
        cin = cout

  def search_space(self) -> SearchSpace:
    if sorted(set(self.extra_depths)) != list(self.extra_depths) or min(self.extra_depths) < 0:
      raise ValueError(f"extra_depths must be sorted, unique and >= 0, got {self.extra_depths}")
    depth_values = sorted({b + d for b in self.base_depths for d in self.extra_depths})
    depth_allowed = np.array([[v - b in self.extra_depths for v in depth_values]
                              for b in self.base_depths])
    n = len(self.width_mults)
    return SearchSpace([
        Leaf("stem_depth", (), (2, 3)),
        Leaf("depth", (self.num_stages,), tuple(depth_values)),
        Leaf("expand", (self.num_stages, max(self.max_blocks)), self.expand_percents,
             parent="depth", gated=True),
        Leaf("width", (self.num_stages + 2,), tuple(range(n))),
    ], allowed={"depth": depth_allowed}, resolutions=self.resolutions)

  def _widths(self, arch):
    """Active (stem mid, stem out, [stage widths]) for a traced or concrete arch."""
    idx = tuple(range(len(self.width_mults)))
    w = arch["width"]
    stem_mid = layers.lookup(w[0], idx, self.stem_mid_widths)
    stem_out = layers.lookup(w[1], idx, self.stem_widths)
    stages = [layers.lookup(w[2 + s], idx, self.stage_widths(s)) for s in range(self.num_stages)]
    return stem_mid, stem_out, stages

  def _mid(self, arch, s: int, i: int):
    keys = (tuple(range(len(self.width_mults))), self.expand_percents)
    return _choice_table((arch["width"][2 + s], arch["expand"][s, i]), keys, self.mid_table(s))

  # ------------------------------------------------------------------ active execution
  # Every width here takes one of a few values (three width multipliers, three expand ratios),
  # so the branches are exact widths, apart from the middle widths with active_branches="width".
  @staticmethod
  def _conv_branches(ins, outs, tied=False):
    """A conv's (in, out) branches: every pair, or matching pairs when one group feeds both."""
    pairs = zip(ins, outs) if tied else ((i, o) for i in ins for o in outs)
    return cheapest_first(pairs, np.prod)

  def _block_branches(self, s: int, i: int):
    """Block (s, i)'s (in, mid, out) branches: per width multiplier, its middle widths (all, or
    the largest: ``active_branches``); the input follows the same multiplier (the previous
    group's width at that index)."""
    if self.active_branches not in ("width", "width_expand"):
      raise ValueError(f"active_branches must be 'width' or 'width_expand', got "
                       f"{self.active_branches!r}")
    ins = (self.stage_widths(s - 1) if s else self.stem_widths) if i == 0 else self.stage_widths(s)
    mids = [row if self.active_branches == "width_expand" else [max(row)]
            for row in self.mid_table(s)]
    branches = [(ins[w], mid, out) for w, out in enumerate(self.stage_widths(s)) for mid in mids[w]]
    return cheapest_first(branches, lambda b: b[0] * b[1] + 9 * b[1] * b[1] + b[1] * b[2])

  # ------------------------------------------------------------------ forward
  @nn.compact
  def __call__(self, x, arch, train: bool = False):
    check_channels(x, self.in_channels)
    check_execution(self.execution, self.executions)
    stem_mid, stem_out, stage_widths = self._widths(arch)
    active = dict(execution=self.execution)
    x = ElasticConvBN(max(self.stem_mid_widths), 3, 2, "relu",
                      branch_widths=self._conv_branches([self.in_channels], self.stem_mid_widths),
                      **active, name="stem0")(x, train, stem_mid)
    run = lambda mdl, x, *widths: mdl(x, train, *widths)
    stem1 = ElasticResidualConv(max(self.stem_mid_widths), branch_widths=self._conv_branches(
        self.stem_mid_widths, self.stem_mid_widths, tied=True), **active, name="stem1")
    x = gated(arch["stem_depth"] == 3, stem1, x, stem_mid, call=run)
    x = ElasticConvBN(max(self.stem_widths), 3, 1, "relu",
                      branch_widths=self._conv_branches(self.stem_mid_widths, self.stem_widths),
                      **active, name="stem2")(x, train, stem_out, in_active=stem_mid)
    x = max_pool_3x3_s2(x)
    cin = stem_out
    for s, i, _, mid_max, out_max, stride, downsample in self._blocks():
      block = ElasticBottleneck(mid_max, out_max, stride, downsample,
                                branch_widths=self._block_branches(s, i), **active,
                                name=f"stage{s}_block{i}")
      mid = self._mid(arch, s, i)
      if i < self.base_depths[s] + min(self.extra_depths):   # every subnet runs this block
        x = block(x, train, mid, stage_widths[s], cin)
      else:
        x = gated(i < arch["depth"][s], block, x, mid, stage_widths[s], cin, call=run)
      cin = stage_widths[s]
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=layers.LINEAR_INIT, name="classifier")(x)

  # ------------------------------------------------------------------ dense subnet
  def block_specs(self, arch) -> list[BottleneckSpec]:
    """Static specs of the blocks an arch runs (concrete arch only)."""
    arch = {k: np.asarray(v) for k, v in arch.items()}
    _, stem_out, stages = self._widths(arch)
    specs, cin = [], int(stem_out)
    for s, i, _, _, _, stride, downsample in self._blocks():
      if i >= int(arch["depth"][s]):
        continue
      cout = int(stages[s])
      specs.append(BottleneckSpec(f"stage{s}_block{i}", cin, int(self._mid(arch, s, i)), cout,
                                  stride, downsample))
      cin = cout
    return specs

  def dense_model(self, arch) -> ResNet:
    arch = {k: np.asarray(v) for k, v in arch.items()}
    stem_mid, stem_out, _ = self._widths(arch)
    return ResNet(stem_mid=int(stem_mid), stem_out=int(stem_out),
                  stem_residual=bool(arch["stem_depth"] == 3), blocks=tuple(self.block_specs(arch)),
                  num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                  in_channels=self.in_channels, parent=None)

  def slice_variables(self, variables: dict, arch) -> dict:
    """The dense subnet's variables: the supernet's, sliced."""
    p = variables["params"]
    dense = self.dense_model(arch)
    mid, out = dense.stem_mid, dense.stem_out
    params = {"stem0": ElasticConvBN.slice_variables(p["stem0"], self.in_channels, mid),
              "stem2": ElasticConvBN.slice_variables(p["stem2"], mid, out),
              "classifier": {"kernel": p["classifier"]["kernel"][:dense.blocks[-1].out_channels],
                             "bias": p["classifier"]["bias"]}}
    if dense.stem_residual:
      params["stem1"] = {"conv": ElasticConvBN.slice_variables(p["stem1"]["conv"], mid, mid)}
    for spec in dense.blocks:
      params[spec.name] = ElasticBottleneck.slice_variables(p[spec.name], spec)
    return with_stats(variables, params)

  # ------------------------------------------------------------------ cost
  def cost(self, arch, resolution: int):
    """(MACs, params) of ``arch`` at ``resolution``; traced arch in, traced numbers out."""
    stem_mid, stem_out, stages = self._widths(arch)
    # cost.count traces with float32 archs so that billions of MACs cannot overflow int32; the
    # channel lookups return int32, so follow the arch's dtype.
    as_arch = lambda v: v.astype(arch["width"].dtype) if jnp.issubdtype(
        arch["width"].dtype, jnp.floating) else v
    stem_mid, stem_out, stages = as_arch(stem_mid), as_arch(stem_out), [as_arch(c) for c in stages]
    blocks, cin = [], stem_out
    for s, i, _, _, _, stride, downsample in self._blocks():
      gate = 1 if i < self.base_depths[s] + min(self.extra_depths) else (i < arch["depth"][s]) * 1
      blocks.append((BottleneckSpec("", cin, as_arch(self._mid(arch, s, i)), stages[s], stride,
                                    downsample), gate))
      cin = stages[s]
    return resnet_cost(in_channels=self.in_channels, resolution=resolution, stem_mid=stem_mid,
                       stem_out=stem_out, stem_gate=(arch["stem_depth"] == 3) * 1, blocks=blocks,
                       num_classes=self.num_classes)


# ---------------------------------------------------------------------- OFA's arch encoding


def to_ofa_arch(model: OFAResNet50, arch) -> dict:
  """ofajax arch -> OFA's ``{"d": [5], "e": [18 floats], "w": [6]}`` (``set_active_subnet``)."""
  arch = {k: np.asarray(v) for k, v in arch.items()}
  d = [max(model.extra_depths) if int(arch["stem_depth"]) == 3 else min(model.extra_depths)]
  d += [int(arch["depth"][s]) - model.base_depths[s] for s in range(model.num_stages)]
  ratios = dict(zip(model.expand_percents, model.expand_ratios))
  e = [ratios[int(arch["expand"][s, i])] for s in range(model.num_stages)
       for i in range(model.max_blocks[s])]
  return {"d": d, "e": e, "w": [int(v) for v in arch["width"]]}


def from_ofa_arch(model: OFAResNet50, ofa_arch: dict) -> dict:
  """OFA's ``{"d", "e", "w"}`` -> a validated ofajax arch. OFA skips the stem conv whenever
  ``d[0] != max(depth_list)``."""
  d, e, w = list(ofa_arch["d"]), list(ofa_arch["e"]), list(ofa_arch["w"])
  n = model.num_stages
  if len(d) != n + 1 or len(e) != sum(model.max_blocks) or len(w) != n + 2:
    raise ValueError(f"an OFA-ResNet arch has d[{n + 1}], e[{sum(model.max_blocks)}] and "
                     f"w[{n + 2}]; got d[{len(d)}], e[{len(e)}], w[{len(w)}]")
  expand = np.full((n, max(model.max_blocks)), max(model.expand_percents), np.int64)
  start = 0
  for s in range(n):
    for i in range(model.max_blocks[s]):
      expand[s, i] = int(round(float(e[start + i]) * 100))
    start += model.max_blocks[s]
  arch = {"stem_depth": 3 if d[0] == max(model.extra_depths) else 2,
          "depth": [model.base_depths[s] + int(d[s + 1]) for s in range(n)],
          "expand": expand, "width": w}
  return model.search_space().validate(arch)


# Tiny variant for tests and CPU demos: the same space (stem skip, D012 per stage, E {0.2, 0.25,
# 0.35}, three widths per group), thin widths, 28x28 single-channel input (odd feature maps, so
# the ceil-mode average pool of the shortcuts is exercised).
TINY = dict(stem_width=40, base_widths=(64, 96, 128, 160), in_channels=1, resolutions=(28,))
