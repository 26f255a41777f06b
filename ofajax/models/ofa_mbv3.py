"""OFA MobileNetV3 supernet (Cai et al., ICLR 2020), and its CompOFA space (Sahni et al., 2021).

Structure as OFA's reference network defines it: a 3x3 stride-2 stem (16, h_swish); a first
block with expand ratio 1 (16, relu, identity shortcut); five elastic stages of widths
24/40/80/112/160, strides 2/2/2/1/2, activations relu/relu/h_swish/h_swish/h_swish, SE in the
40/112/160 stages, each with up to 4 blocks (kernel 3/5/7, expand 3/4/6, depth 2/3/4); a 1x1 head
to 960 (h_swish), global pooling, a 1x1 feature mix to 1280 (no BN, no bias, h_swish), dropout
and the classifier. Widths are ``make_divisible(base * width_mult, 8)``; a block's middle width
is ``make_divisible(round(in * expand), 8)`` and its SE width ``make_divisible(mid // 4, 8)``.

The arch is ``{"depth": int32[5], "kernel": int32[5, 4], "expand": int32[5, 4]}``.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ofajax import layers
from ofajax.layers import BlockSpec, ElasticMBConv, make_divisible
from ofajax.layers.gating import gated
from ofajax.layers.stats import with_stats
from ofajax.models.base import InputSpec, check_channels, check_execution
from ofajax.models.mobilenet import MobileNet, mobilenet_cost
from ofajax.space import Leaf, SearchSpace

# CompOFA fixes each stage's kernel to MobileNetV3-Large's and couples expand to depth.
COMPOFA_KERNELS = (3, 5, 3, 3, 5)
COMPOFA_EXPAND_FOR_DEPTH = {2: 3, 3: 4, 4: 6}


class OFAMobileNetV3(nn.Module):
  """Elastic MobileNetV3; ``apply(variables, x, arch, train=...)``."""
  num_classes: int = 1000
  width_mult: float = 1.0
  base_widths: Sequence[int] = (16, 16, 24, 40, 80, 112, 160, 960, 1280)
  stem_stride: int = 2
  strides: Sequence[int] = (1, 2, 2, 2, 1, 2)
  acts: Sequence[str] = ("relu", "relu", "relu", "h_swish", "h_swish", "h_swish")
  use_se: Sequence[bool] = (False, False, True, False, True, True)
  kernel_choices: Sequence[int] = (3, 5, 7)
  expand_choices: Sequence[int] = (3, 4, 6)
  depth_choices: Sequence[int] = (2, 3, 4)
  in_channels: int = 3
  dropout_rate: float = 0.1
  kernel_transform: bool = True
  depthwise_impl: str = "shift"
  resolutions: Sequence[int] = tuple(range(128, 225, 4))
  execution: str = "masked"   # or "active": see ElasticMBConv and docs/design.md
  executions: ClassVar[tuple[str, ...]] = ("masked", "active")


  @property
  def input_spec(self) -> InputSpec:
    return InputSpec("image", channels=self.in_channels)

  # ------------------------------------------------------------------ static structure
  @property
  def widths(self) -> list[int]:
    return [make_divisible(w * self.width_mult, 8) for w in self.base_widths]

  @property
  def num_stages(self) -> int:
    return len(self.strides) - 1

  @property
  def max_depth(self) -> int:
    return max(self.depth_choices)

  def _stage_blocks(self):
    """Yields (stage, index, in, out, stride, act, se, residual, mid_table) per elastic block."""
    widths = self.widths
    cin = widths[1]
    for s in range(self.num_stages):
      cout = widths[s + 2]
      for i in range(self.max_depth):
        stride = self.strides[s + 1] if i == 0 else 1
        mids = [make_divisible(round(cin * e), 8) for e in self.expand_choices]
        yield (s, i, cin, cout, stride, self.acts[s + 1], self.use_se[s + 1],
               stride == 1 and cin == cout, mids)
        cin = cout

  def search_space(self) -> SearchSpace:
    s, d = self.num_stages, self.max_depth
    if min(self.depth_choices) < 1:
      raise ValueError(f"depth choices must be >= 1, got {self.depth_choices}")
    return SearchSpace([
        Leaf("depth", (s,), tuple(sorted(self.depth_choices))),
        Leaf("kernel", (s, d), tuple(sorted(self.kernel_choices)), parent="depth", gated=True),
        Leaf("expand", (s, d), tuple(sorted(self.expand_choices)), parent="depth", gated=True),
    ], resolutions=self.resolutions)

  def compofa_space(self) -> SearchSpace:
    space = self.search_space()
    kernels = COMPOFA_KERNELS[:self.num_stages]
    return space.restrict(kernel=[[k] for k in kernels]).couple("expand", COMPOFA_EXPAND_FOR_DEPTH)

  # ------------------------------------------------------------------ forward
  @nn.compact
  def __call__(self, x, arch, train: bool = False):
    check_channels(x, self.in_channels)
    check_execution(self.execution, self.executions)
    widths = self.widths
    x = layers.ElasticConvBN(widths[0], 3, self.stem_stride, "h_swish", name="stem")(x, train)
    x = ElasticMBConv(widths[0], widths[1], (3,), self.strides[0], self.acts[0], self.use_se[0],
                      has_expand=False, residual=self.strides[0] == 1 and widths[0] == widths[1],
                      depthwise_impl=self.depthwise_impl, name="first_block")(x, train)
    for s, i, cin, cout, stride, act, se, residual, mids in self._stage_blocks():
      block = ElasticMBConv(max(mids), cout, tuple(self.kernel_choices), stride, act, se,
                            has_expand=True, residual=residual,
                            kernel_transform=self.kernel_transform,
                            depthwise_impl=self.depthwise_impl,
                            branch_widths=tuple((cin, m, cout) for m in sorted(mids)),
                            execution=self.execution, name=f"stage{s}_block{i}")
      if i == 0:  # the first block of a stage always runs (it changes width / resolution)
        x = block(x, train, mid_active=layers.lookup(arch["expand"][s, i], self.expand_choices,
                                                     mids),
                  kernel_size=arch["kernel"][s, i])
      else:  # later blocks run only where the stage's depth reaches them
        mid = layers.lookup(arch["expand"][s, i], self.expand_choices, mids)
        x = gated(i < arch["depth"][s], block, x, mid, arch["kernel"][s, i],
                  call=lambda mdl, x, mid, k: mdl(x, train, mid_active=mid, kernel_size=k))
    x = layers.ElasticConvBN(widths[-2], act="h_swish", name="head")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = layers.h_swish(nn.Dense(widths[-1], use_bias=False, kernel_init=layers.LINEAR_INIT,
                                     name="feature_mix")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=layers.LINEAR_INIT, name="classifier")(x)

  # ------------------------------------------------------------------ dense subnet
  def block_specs(self, arch) -> list[BlockSpec]:
    """Static specs of the blocks an arch runs (concrete arch only)."""
    arch = {k: np.asarray(v) for k, v in arch.items()}
    widths = self.widths
    specs = [BlockSpec("first_block", widths[0], widths[0], widths[1], 3, self.strides[0],
                       self.acts[0], self.use_se[0], False,
                       self.strides[0] == 1 and widths[0] == widths[1])]
    for s, i, cin, cout, stride, act, se, residual, mids in self._stage_blocks():
      if i >= int(arch["depth"][s]):
        continue
      mid = mids[list(self.expand_choices).index(int(arch["expand"][s, i]))]
      specs.append(BlockSpec(f"stage{s}_block{i}", cin, mid, cout, int(arch["kernel"][s, i]),
                             stride, act, se, True, residual))
    return specs

  def dense_model(self, arch) -> MobileNet:
    widths = self.widths
    return MobileNet(stem_width=widths[0], blocks=tuple(self.block_specs(arch)),
                     head_width=widths[-2], num_classes=self.num_classes,
                     stem_stride=self.stem_stride, stem_act="h_swish", head_act="h_swish",
                     feature_mix_width=widths[-1], dropout_rate=self.dropout_rate,
                     depthwise_impl=self.depthwise_impl, in_channels=self.in_channels,
                     parent=None)

  def slice_variables(self, variables: dict, arch) -> dict:
    """The dense subnet's variables: the supernet's, sliced (kernel transforms baked in)."""
    p = variables["params"]
    params = {k: p[k] for k in ("stem", "head", "feature_mix", "classifier")}
    for spec in self.block_specs(arch):
      block = ElasticMBConv(spec.mid_channels, spec.out_channels,
                            (3,) if spec.name == "first_block" else tuple(self.kernel_choices),
                            has_expand=spec.has_expand, use_se=spec.use_se, parent=None)
      params[spec.name] = block.slice_variables(p[spec.name], spec)
    return with_stats(variables, params)

  # ------------------------------------------------------------------ cost
  def cost(self, arch, resolution: int):
    """(MACs, params) of ``arch`` at ``resolution``; traced arch in, traced numbers out."""
    widths = self.widths
    blocks = [(BlockSpec("first_block", widths[0], widths[0], widths[1], 3, self.strides[0],
                         self.acts[0], self.use_se[0], False, False), 1)]
    for s, i, cin, cout, stride, act, se, residual, mids in self._stage_blocks():
      mid = layers.lookup(arch["expand"][s, i], self.expand_choices, mids)
      gate = 1 if i == 0 else (i < arch["depth"][s]) * 1
      blocks.append((BlockSpec("", cin, mid, cout, arch["kernel"][s, i], stride, act, se, True,
                               residual), gate))
    return mobilenet_cost(in_channels=self.in_channels, resolution=resolution,
                          stem_width=widths[0], stem_stride=self.stem_stride, blocks=blocks,
                          head_in=widths[-3], head_width=widths[-2],
                          feature_mix_width=widths[-1], num_classes=self.num_classes)


# Tiny variant for tests and CPU demos: same space (5 stages x 4 blocks, K357 E346 D234), thin
# widths, 28x28 single-channel input.
TINY = dict(base_widths=(8, 8, 16, 24, 32, 40, 48, 96, 128), in_channels=1, dropout_rate=0.0,
            resolutions=(28,))
