"""Slimmable MobileNetV2 supernet: the width-only space of US-Nets (Yu & Huang, ICCV 2019) and
AutoSlim (Yu & Huang, 2019), on MobileNetV2 (Sandler et al., CVPR 2018).

Structure as MobileNetV2 defines it: a 3x3 stride-2 stem (32, relu6); inverted-residual stages
with settings (t, c, n, s) = (1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1),
(6,160,3,2), (6,320,1,1), kernel 3 everywhere, no SE; a 1x1 head to 1280 (relu6), global
pooling, dropout and the classifier (no feature-mix). Widths are ``make_divisible(c *
width_mult, 8)``; as the paper does, the head keeps 1280 for ``width_mult < 1``.

The arch is ``{"width": int32[G]}``, one active channel count per independent *width group*:

* ``stem``: the stem's output, which is also the first block's depthwise width (t = 1, so that
  block has no expand conv);
* ``stage{s}_out``: every block of stage ``s`` outputs this width; a block with stride 1 and
  equal input / output widths adds its input, so the residual ties its input and output to one
  group (when a stage's *first* block has a residual too, its output joins its input's group and
  the label names both, e.g. ``stem+stage0_out``);
* ``stage{s}_block{i}_mid``: the expanded (middle) width of each block with t != 1;
* ``head``: the 1x1 head conv, which is also the classifier's input width.

A group of maximum width C may take every multiple of 8 from ``make_divisible(min_width_ratio *
C, 8)`` to C (AutoSlim's channel bins are of 8 too; US-Nets' 0.35x lower bound).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ofajax import layers
from ofajax.layers import BlockSpec, ElasticConvBN, ElasticMBConv, make_divisible
from ofajax.layers.branching import bucket_widths, cheapest_first
from ofajax.layers.stats import with_stats
from ofajax.models.base import InputSpec, check_channels, check_execution
from ofajax.models.mobilenet import MobileNet, mobilenet_cost
from ofajax.space import Leaf, SearchSpace

MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
ACT = "relu6"
KERNEL = 3


class _Block(NamedTuple):
  """Static plan of one supernet block: max widths and the groups its widths come from."""
  name: str
  in_channels: int
  mid_channels: int
  out_channels: int
  stride: int
  has_expand: bool
  residual: bool
  in_group: int
  mid_group: int    # == in_group when has_expand is False (depthwise runs on the input)
  out_group: int


class _Plan(NamedTuple):
  labels: tuple[str, ...]
  max_widths: tuple[int, ...]
  stem_group: int
  head_group: int
  blocks: tuple[_Block, ...]


class SlimMobileNetV2(nn.Module):
  """Slimmable MobileNetV2; ``apply(variables, x, arch, train=...)``."""
  num_classes: int = 1000
  width_mult: float = 1.0
  min_width_ratio: float = 0.35
  settings: Sequence[Sequence[int]] = MOBILENET_V2_SETTINGS
  stem_base_width: int = 32
  head_base_width: int = 1280
  # False: the 1x1 head keeps its full width in every subnet (US-Nets slims everything up to the
  # head's input; its head conv and classifier stay at 1280).
  slim_head: bool = True
  stem_stride: int = 2
  in_channels: int = 3
  dropout_rate: float = 0.2
  depthwise_impl: str = "shift"
  resolutions: Sequence[int] = (224,)
  execution: str = "masked"    # or "active": see ofajax.layers.branching
  executions: ClassVar[tuple[str, ...]] = ("masked", "active")
  # Active execution's width buckets, as fractions of every group's maximum width: a block runs
  # at the smallest bucket holding all its groups' active widths (masking the rest inside it).
  width_buckets: Sequence[float] = (0.5, 0.75, 1.0)

  @property
  def input_spec(self) -> InputSpec:
    return InputSpec("image", channels=self.in_channels)

  # ------------------------------------------------------------------ static structure
  def _plan(self) -> _Plan:
    labels, max_widths = [], []

    def new_group(label, width):
      labels.append(label)
      max_widths.append(width)
      return len(labels) - 1

    stem = new_group("stem", make_divisible(self.stem_base_width * self.width_mult, 8))
    # Pass 1: stage outputs (residual-tied), so they come before every middle group.
    raw = []  # (name, s, i, cin, cout, stride, t, in_group, out_group, residual)
    cin, in_group = max_widths[stem], stem
    for s, (t, c, n, stride0) in enumerate(self.settings):
      cout = make_divisible(c * self.width_mult, 8)
      if stride0 == 1 and cin == cout:  # the first block is residual: same group as its input
        out_group = in_group
        labels[in_group] += f"+stage{s}_out"
      else:
        out_group = new_group(f"stage{s}_out", cout)
      for i in range(n):
        stride = stride0 if i == 0 else 1
        raw.append((f"stage{s}_block{i}", s, i, cin, cout, stride, t, in_group, out_group,
                    stride == 1 and cin == cout))
        cin, in_group = cout, out_group
    # Pass 2: one middle group per block that expands.
    blocks = []
    for name, s, i, cin, cout, stride, t, gin, gout, residual in raw:
      if t != 1:
        mid = make_divisible(round(cin * t), 8)
        gmid = new_group(f"{name}_mid", mid)
      else:
        mid, gmid = cin, gin
      blocks.append(_Block(name, cin, mid, cout, stride, t != 1, residual, gin, gmid, gout))
    head_width = make_divisible(self.head_base_width * max(1.0, self.width_mult), 8)
    head = new_group("head", head_width)
    return _Plan(tuple(labels), tuple(max_widths), stem, head, tuple(blocks))

  def width_groups(self) -> tuple[str, ...]:
    """Per arch["width"] position, the layer(s) it slims: ``stem``, ``stage2_out``,
    ``stage3_block1_mid``, ``head``."""
    return self._plan().labels

  def max_widths(self) -> tuple[int, ...]:
    """Per arch["width"] position, the supernet's (maximum) channel count."""
    return self._plan().max_widths

  def group_values(self) -> tuple[tuple[int, ...], ...]:
    """Per arch["width"] position, the widths it may take (multiples of 8, ascending)."""
    if not 0 < self.min_width_ratio <= 1:
      raise ValueError(f"min_width_ratio must be in (0, 1], got {self.min_width_ratio}")
    out = []
    plan = self._plan()
    for g, c in enumerate(plan.max_widths):
      low = min(c, make_divisible(self.min_width_ratio * c, 8))
      low = c if g == plan.head_group and not self.slim_head else low
      out.append(tuple(range(low, c + 1, 8)))
    return tuple(out)

  def search_space(self) -> SearchSpace:
    per_group = self.group_values()
    values = tuple(sorted(set().union(*per_group)))
    allowed = np.array([[v in group for v in values] for group in per_group], bool)
    return SearchSpace([Leaf("width", (len(per_group),), values)], allowed={"width": allowed},
                       resolutions=self.resolutions)

  # ------------------------------------------------------------------ forward
  @nn.compact
  def __call__(self, x, arch, train: bool = False):
    check_channels(x, self.in_channels)
    check_execution(self.execution, self.executions)
    plan = self._plan()
    width = arch["width"]
    buckets = self._bucket_widths()
    branches = lambda *groups: cheapest_first(zip(*(buckets[g] for g in groups)), np.prod)
    x = ElasticConvBN(plan.max_widths[plan.stem_group], KERNEL, self.stem_stride, ACT,
                      branch_widths=cheapest_first([(self.in_channels, w)
                                                   for w in buckets[plan.stem_group]], np.prod),
                      execution=self.execution, name="stem")(
                          x, train, out_active=width[plan.stem_group])
    for b in plan.blocks:
      # The residual tie makes x's and y's active widths equal, so x + y stays a prefix.
      x = ElasticMBConv(b.mid_channels, b.out_channels, (KERNEL,), b.stride, ACT, False,
                        has_expand=b.has_expand, residual=b.residual,
                        depthwise_impl=self.depthwise_impl,
                        branch_widths=branches(b.in_group, b.mid_group, b.out_group),
                        bucketed=True, execution=self.execution, name=b.name)(
                            x, train, mid_active=width[b.mid_group], kernel_size=None,
                            out_active=width[b.out_group], in_active=width[b.in_group])
    last = plan.blocks[-1].out_group if plan.blocks else plan.stem_group
    x = ElasticConvBN(plan.max_widths[plan.head_group], act=ACT,
                      branch_widths=branches(last, plan.head_group), execution=self.execution,
                      name="head")(x, train, out_active=width[plan.head_group],
                                   in_active=width[last])
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=layers.LINEAR_INIT, name="classifier")(x)

  def _bucket_widths(self) -> list[tuple[int, ...]]:
    """Per width group, its static width in each bucket of ``width_buckets``."""
    return [bucket_widths(values, self.width_buckets) for values in self.group_values()]

  # ------------------------------------------------------------------ dense subnet
  def _widths(self, arch) -> list[int]:
    width = np.asarray(arch["width"])
    return [int(w) for w in width.reshape(-1)]

  def block_specs(self, arch) -> list[BlockSpec]:
    """Static specs of the dense subnet's blocks (concrete arch only)."""
    w = self._widths(arch)
    return [BlockSpec(b.name, w[b.in_group], w[b.mid_group], w[b.out_group], KERNEL, b.stride,
                      ACT, False, b.has_expand, b.residual) for b in self._plan().blocks]

  def dense_model(self, arch) -> MobileNet:
    plan = self._plan()
    w = self._widths(arch)
    return MobileNet(stem_width=w[plan.stem_group], blocks=tuple(self.block_specs(arch)),
                     head_width=w[plan.head_group], num_classes=self.num_classes,
                     stem_stride=self.stem_stride, stem_act=ACT, head_act=ACT,
                     feature_mix_width=0, dropout_rate=self.dropout_rate,
                     depthwise_impl=self.depthwise_impl, in_channels=self.in_channels,
                     parent=None)

  def slice_variables(self, variables: dict, arch) -> dict:
    """The dense subnet's variables: the supernet's, sliced to the arch's widths."""
    p = variables["params"]
    plan = self._plan()
    w = self._widths(arch)
    stem, head = w[plan.stem_group], w[plan.head_group]
    head_in = w[plan.blocks[-1].out_group] if plan.blocks else stem
    params = {"stem": ElasticConvBN.slice_variables(p["stem"], self.in_channels, stem),
              "head": ElasticConvBN.slice_variables(p["head"], head_in, head),
              "classifier": {"kernel": p["classifier"]["kernel"][:head],
                             "bias": p["classifier"]["bias"]}}
    for b, spec in zip(plan.blocks, self.block_specs(arch)):
      block = ElasticMBConv(b.mid_channels, b.out_channels, (KERNEL,), has_expand=b.has_expand,
                            use_se=False, parent=None)
      params[b.name] = block.slice_variables(p[b.name], spec)
    return with_stats(variables, params)

  # ------------------------------------------------------------------ cost
  def cost(self, arch, resolution: int):
    """(MACs, params) of ``arch`` at ``resolution``; traced arch in, traced numbers out."""
    plan = self._plan()
    width = arch["width"]
    blocks = [(BlockSpec(b.name, width[b.in_group], width[b.mid_group], width[b.out_group],
                         KERNEL, b.stride, ACT, False, b.has_expand, b.residual), 1)
              for b in plan.blocks]
    head_in = width[plan.blocks[-1].out_group] if plan.blocks else width[plan.stem_group]
    return mobilenet_cost(in_channels=self.in_channels, resolution=resolution,
                          stem_width=width[plan.stem_group], stem_stride=self.stem_stride,
                          blocks=blocks, head_in=head_in, head_width=width[plan.head_group],
                          feature_mix_width=0, num_classes=self.num_classes)


# Tiny variant for tests and CPU demos: five thin stages (one t = 1 block, residual-tied
# stages), 28x28 single-channel input.
TINY = dict(settings=((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2), (6, 32, 2, 2), (6, 48, 1, 1)),
            stem_base_width=16, head_base_width=128, in_channels=1, dropout_rate=0.0,
            resolutions=(28,))
