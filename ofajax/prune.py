"""One-shot channel pruning of a supernet to a smaller dense model.

Elastic training gives many subnets; sometimes one smaller model is all that is wanted, pruned
from trained weights by a classic criterion (and fine-tuned by the user afterwards). For a
supernet made by ``ofajax.elasticize`` every elastic channel group is ranked, its least
important ``1 - keep`` share is removed, and the result is the user's own module again, with
static smaller shapes:

* ``criterion="l1"``: the L1 norm of each channel's producing filters, summed over the group's
  producers (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017);
* ``criterion="bn_scale"``: |gamma| of the BatchNorms over the group (Network Slimming, Liu et
  al., ICCV 2017); a group without a scaled BatchNorm is refused by name.

Each group keeps ``round(keep * size / divisor) * divisor`` channels. Fixed groups (the model's
input and output, frozen layers) stay whole; kernels keep their full size and no block is
skipped. Ranking is :func:`ofajax.elastic.sorting.sort_channels`, which permutes every array
indexed by a group, so a width prefix holds the kept channels; extraction is
:func:`ofajax.export.extract_subnet`. The pruned dense model computes exactly what the masked
supernet computes at ``Pruned.arch`` on the sorted variables.

Built-in CNN supernets (``ofa_mbv3``, ``compofa_mbv3``, ``ofa_resnet50``,
``slim_mobilenet_v2``) are pruned where :mod:`ofajax.channel_sorting` ranks channels: each
block's middle (expanded) channels, by OFA's L1 of the weights that read them. Each such choice
takes the allowed value nearest ``keep`` times its largest; the widths that residual connections
share stay full, since nothing ranks them.

    pruned = prune(supernet, variables, space, keep=0.5)
    save_pruned(pruned, "pruned/")     # pruned.msgpack (the user's layout) + pruned.json
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Mapping

import flax
import jax
import numpy as np

from ofajax import channel_sorting, cost, export
from ofajax.elastic import sorting
from ofajax.elastic.dense import DenseTwin
from ofajax.elastic.plan import NET
from ofajax.elastic.supernet import ElasticNet
from ofajax.models import OFAMobileNetV3, OFAResNet50, SlimMobileNetV2
from ofajax.workdir import load_supernet

# criterion -> sorting's rank_by for elasticized models
CRITERIA = {"l1": "filters", "bn_scale": "bn_scale"}
VARIABLES_FILE = "pruned.msgpack"
SUMMARY_FILE = "pruned.json"
BUILTIN_RANKING = "consumers (OFA)"   # what channel_sorting ranks a built-in supernet by


@dataclasses.dataclass(frozen=True)
class Pruned:
  """A pruned dense model, the supernet arch it is, and its cost before and after."""
  dense_model: Any
  dense_variables: dict   # as extract_subnet gives them (a DenseTwin's: the user's under "net")
  arch: dict              # {leaf: int64 array}: the supernet's arch that the dense model is
  keep: float
  criterion: str
  ranking: str            # what ranked the channels ("filters", "bn_scale", "consumers (OFA)")
  divisor: int
  resolution: int
  macs_before: int
  macs_after: int
  params_before: int
  params_after: int

  @property
  def user_variables(self) -> dict:
    """The dense variables in the layout the plain module (built at the pruned widths) has:
    an elasticized model's unwrapped from the ``"net"`` nesting, empty collections dropped."""
    variables = self.dense_variables
    if isinstance(self.dense_model, DenseTwin):
      variables = {name: tree.get(NET, {}) for name, tree in variables.items()}
    return {name: tree for name, tree in variables.items() if name == "params" or tree}

  def summary(self) -> str:
    return (f"MACs {self.macs_before:,} -> {self.macs_after:,} "
            f"({self.macs_after / max(self.macs_before, 1):.1%}), params "
            f"{self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(self.params_before, 1):.1%})")


# --------------------------------------------------------------------------- pruning


def prune(supernet, variables: Mapping, space=None, keep: float = 0.5, criterion: str = "l1",
          divisor: int = 1, resolution: int | None = None) -> Pruned:
  """The dense model that keeps each elastic channel group's most important ``keep`` share.

  Args:
    supernet: an ``ofajax.elasticize`` supernet, or a built-in CNN supernet (module docstring).
    variables: its variables (``{"params", "batch_stats"}``), trained.
    space: its search space (default ``supernet.search_space()``): a built-in supernet's
      choices come from it, and the cost is counted at its largest resolution.
    keep: the share of every elastic group's channels kept, in (0, 1].
    criterion: "l1" (filter L1 norm) or "bn_scale" (|gamma| of the group's BatchNorms).
    divisor: kept widths are multiples of it (elasticized models only).
    resolution: the input resolution the cost is counted at (default: the space's largest).
  """
  _check_args(keep, criterion, divisor)
  space = supernet.search_space() if space is None else space
  resolution = int(max(space.resolutions) if resolution is None else resolution)
  if isinstance(supernet, ElasticNet):
    model, ranked, arch, full = _prune_elastic(supernet, variables, keep, criterion, divisor)
    space, ranking = model.search_space(), CRITERIA[criterion]
  else:
    model, ranked, arch, full = _prune_builtin(supernet, variables, space, keep, criterion,
                                               divisor)
    ranking = BUILTIN_RANKING
  dense, dense_variables = export.extract_subnet(model, ranked, arch, space)
  before, after = (cost.count(model, a, resolution) for a in (full, arch))
  return Pruned(dense, dense_variables, arch, float(keep), criterion, ranking, int(divisor),
                resolution, before["macs"], after["macs"], before["params"], after["params"])


def prune_to_arch(supernet: ElasticNet, variables: Mapping, arch, criterion: str = "l1",
                  resolution: int | None = None) -> Pruned:
  """The dense model at one arch of an elasticized supernet's space (e.g. a subnet a search
  chose), keeping each group's most important channels by ``criterion`` rather than the
  supernet's trained prefix: the pruning baseline at the same widths, so the same MACs."""
  _check_args(1.0, criterion, 1)
  if not isinstance(supernet, ElasticNet):
    raise ValueError("prune_to_arch takes an ofajax.elasticize supernet; for a built-in one use "
                     "prune(..., keep=...)")
  space = supernet.search_space()
  arch = space.to_host(space.validate(arch))
  resolution = int(max(space.resolutions) if resolution is None else resolution)
  ranked = sorting.sort_channels(supernet, variables, rank_by=CRITERIA[criterion])
  dense, dense_variables = export.extract_subnet(supernet, ranked, arch, space)
  full = space.to_host(space.largest())
  before, after = (cost.count(supernet, a, resolution) for a in (full, arch))
  keep = after["macs"] / max(before["macs"], 1)   # no single share: record the MACs kept
  return Pruned(dense, dense_variables, arch, float(keep), criterion, CRITERIA[criterion], 1,
                resolution, before["macs"], after["macs"], before["params"], after["params"])


def _check_args(keep, criterion: str, divisor) -> None:
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
  if not isinstance(keep, numbers.Real) or not 0 < keep <= 1:   # NaN fails the comparison
    raise ValueError(f"keep is the share of channels kept, in (0, 1]; got {keep!r}")
  if not isinstance(divisor, (int, np.integer)) or divisor < 1:
    raise ValueError(f"divisor must be a positive integer, got {divisor!r}")


def kept_width(keep: float, size: int, divisor: int = 1) -> int:
  """Channels a group of ``size`` keeps (elasticize's own rounding of a width fraction)."""
  return min(int(round(keep * size / divisor)) * divisor, size)


def _prune_elastic(supernet: ElasticNet, variables, keep, criterion, divisor):
  """(supernet whose space holds the pruned arch, sorted variables, pruned arch, full arch)."""
  plan, groups = supernet.plan(), supernet.elastic_groups()
  if not groups:
    raise ValueError("this supernet has no elastic channel group to prune: every group is "
                     "fixed (see ofajax.elastic.describe); nothing would be removed")
  sizes = [plan.groups[g].size for g in groups]
  widths = [kept_width(keep, size, divisor) for size in sizes]
  _check_nonempty(plan, groups, sizes, widths, keep, divisor)
  ranked = sorting.sort_channels(supernet, variables, rank_by=CRITERIA[criterion])
  # The pruned width need not be a choice of the original space; a supernet whose only width
  # fraction is ``keep`` (its groups also keep their full size) has it, so the usual
  # validation of extract_subnet and cost.count applies.
  model = supernet.clone(parent=None, widths=(float(keep),), divisor=int(divisor))
  full = model.search_space().to_host(model.search_space().largest())
  arch = {**full, "width": np.asarray(widths, np.int64)}
  return model, ranked, arch, full


def _check_nonempty(plan, groups, sizes, widths, keep, divisor) -> None:
  """A ValueError naming the smallest group ``keep`` empties and the keep that would do."""
  empty = [(size, g) for g, size, w in zip(groups, sizes, widths) if w < 1]
  if not empty:
    return
  size, g = min(empty)
  need = 0.5 * divisor / size   # round() must give at least 1: keep * size / divisor > 0.5
  least = min(divisor, size)
  raise ValueError(
      f"keep={keep} leaves no channel of the group produced by "
      f"{', '.join(plan.groups[g].producers)} ({size} channels, divisor {divisor}): "
      f"round(keep * {size} / {divisor}) = 0. Any keep above {need:.4g} leaves it {least} "
      f"channel{'s' * (least > 1)}; every group needs keep above "
      f"{0.5 * divisor / min(sizes):.4g}")


def _prune_builtin(model, variables, space, keep, criterion, divisor):
  """(model, sorted variables, pruned arch, full arch) of a built-in CNN supernet."""
  if criterion != "l1":
    raise ValueError(f"criterion {criterion!r} is for elasticized models; built-in supernets "
                     "rank channels by OFA's L1 of the weights that read them (criterion 'l1')")
  if divisor != 1:
    raise ValueError("divisor applies to elasticized models; a built-in supernet's widths are "
                     "its search space's choices")
  full = space.to_host(space.largest())
  arch = {name: value.copy() for name, value in full.items()}
  choices = 0
  for name, pos in _ranked_positions(model, space):
    parent = space.leaf(name).parent   # a coupled leaf's choices depend on its parent's value
    allowed = np.asarray(space.choices(name, pos, int(full[parent][pos[:-1]]) if parent else None))
    choices += allowed.size > 1
    # nearest to keep x largest; on a tie the larger (keeps more channels)
    arch[name][pos] = allowed[np.lexsort((-allowed, np.abs(allowed - keep * allowed.max())))[0]]
  if not choices:
    raise ValueError(
        f"this search space allows {type(model).__name__} no smaller middle width at full depth "
        "(CompOFA's space couples the expand ratio to depth), so nothing would be pruned; pass "
        "the model's own space: prune(model, variables, model.search_space(), ...)")
  return model, channel_sorting.sort_channels(model, variables), arch, full


def _ranked_positions(model, space) -> list[tuple[str, tuple[int, ...]]]:
  """(leaf, position) of every width choice whose channels channel_sorting ranks."""
  if isinstance(model, (OFAMobileNetV3, OFAResNet50)):
    return [("expand", pos) for pos in np.ndindex(space.leaf("expand").shape)]
  if isinstance(model, SlimMobileNetV2):
    return [("width", (i,)) for i, label in enumerate(model.width_groups())
            if label.endswith("_mid")]
  raise NotImplementedError(
      f"prune supports supernets made by ofajax.elasticize and the built-in CNN supernets "
      f"(ofa_mbv3, compofa_mbv3, ofa_resnet50, slim_mobilenet_v2), not {type(model).__name__}; "
      "for an elastic transformer, ofajax.importance.reorder_by_importance ranks heads and "
      "neurons, and extract_subnet cuts any arch")


# --------------------------------------------------------------------------- files


def layer_widths(variables: Mapping) -> dict[str, int]:
  """{layer path: output channels} of a dense model's variables: a kernel's last axis, else (a
  BatchNorm) its vectors'."""
  out = {}

  def walk(tree, path):
    arrays = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if arrays:
      out.setdefault("/".join(path), int(np.shape(arrays.get(
          "kernel", next(iter(arrays.values()))))[-1]))
    for name, sub in tree.items():
      if isinstance(sub, Mapping):
        walk(sub, path + (name,))

  for collection in ("params", "batch_stats"):
    walk(variables.get(collection, {}), ())
  return out


def save_pruned(pruned: Pruned, directory: str, extra: Mapping | None = None) -> None:
  """Writes ``pruned.msgpack`` (the variables in the plain module's layout, see
  :attr:`Pruned.user_variables`) and ``pruned.json`` (what was pruned, how, the arch, every
  layer's output width, the cost before and after; ``extra`` is added to it)."""
  os.makedirs(directory, exist_ok=True)
  variables = jax.device_get(pruned.user_variables)
  with open(os.path.join(directory, VARIABLES_FILE), "wb") as f:
    f.write(flax.serialization.to_bytes(variables))
  summary = {
      "keep": pruned.keep, "criterion": pruned.criterion, "ranking": pruned.ranking,
      "divisor": pruned.divisor, "resolution": pruned.resolution,
      "arch": {k: np.asarray(v).tolist() for k, v in pruned.arch.items()},
      "layer_widths": layer_widths(variables),
      "macs": {"before": pruned.macs_before, "after": pruned.macs_after},
      "params": {"before": pruned.params_before, "after": pruned.params_after},
      **dict(extra or {})}
  with open(os.path.join(directory, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=2)


def load_pruned_variables(directory: str) -> dict:
  """The variables :func:`save_pruned` wrote (nested dicts of numpy arrays), ready for the plain
  module built at the pruned widths (``pruned.json``'s ``layer_widths``)."""
  path = os.path.join(directory, VARIABLES_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: {directory!r} is not a directory that "
                            "save_pruned (python prune.py --out ...) wrote")
  with open(path, "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def prune_workdir(workdir: str, out_dir: str, keep: float = 0.5, criterion: str = "l1",
                  divisor: int = 1, step: int | None = None) -> Pruned:
  """Prunes a training workdir's supernet (its latest checkpoint, or ``step``'s), writes
  :func:`save_pruned`'s files into ``out_dir`` and prints a one-line summary."""
  _check_args(keep, criterion, divisor)   # before the checkpoint is read
  trained = load_supernet(workdir, step)
  pruned = prune(trained.model, jax.device_get(trained.variables), trained.space, keep,
                 criterion, divisor, resolution=int(trained.config.resolution))
  save_pruned(pruned, out_dir, extra={"workdir": os.path.abspath(workdir), "step": trained.step,
                                      "model": trained.model_name})
  print(f"pruned {workdir} (step {trained.step}, keep {keep}, {criterion}) into {out_dir}: "
        f"{pruned.summary()}", flush=True)
  return pruned


__all__ = ["CRITERIA", "Pruned", "kept_width", "layer_widths", "load_pruned_variables", "prune",
           "prune_to_arch", "prune_workdir", "save_pruned"]
