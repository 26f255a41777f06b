"""Training phases, and the subnets each step of a phase trains.

A phase is a config entry (``config.phases``): epochs, learning rate, subnets per step, how to
sample them, and a restriction of the search space (progressive shrinking). :class:`Phase`
turns it into static facts for the host and into *traced data* for the jitted step
(:meth:`Phase.as_data`), so every phase of a run shares one compiled step.

How a step picks its subnets (``sampling``):

* ``"sandwich"``: slot 0 is the phase's largest subnet, slot 1 its smallest, the rest random
  (US-Nets' sandwich rule);
* ``"random"``: every slot random (OFA's progressive-shrinking phases);
* ``"all"``: every subnet of the phase's *family* each step, largest first (DynaBERT trains
  every width multiplier, and in its second stage every depth too, on each batch).

Random slots draw a value per position of every leaf (OFA), except the leaves listed in
``uniform``: those share one width multiplier for the whole network (US-Nets, DynaBERT), drawn
from a fixed grid (:data:`FAMILY_SIZE` multipliers) or listed in ``multipliers``. The family is
a fixed-size stack of archs in the phase data, so a phase with a family compiles nothing new.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLINGS = ("sandwich", "random", "all")
# Rows of every phase's family stack: the uniform-multiplier grid of a random phase, and the
# most subnets a phase with sampling="all" may run per step. Fixed so that phases with and
# without a family share one compiled step.
FAMILY_SIZE = 64


class Phase:
  """A training phase as static facts (host) and as traced data (the step's argument)."""

  def __init__(self, cfg, index: int, space, steps_per_epoch: int):
    self.name = cfg.get("name", f"phase{index}")
    self.steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    # optax's cosine length includes the warmup, which must leave at least one step of decay.
    self.warmup_steps = min(int(round(cfg.get("warmup_epochs", 0.0) * steps_per_epoch)),
                            self.steps - 1)
    self.learning_rate = float(cfg.learning_rate)
    self.sampling = cfg.get("sampling", "sandwich")
    if self.sampling not in SAMPLINGS:
      raise ValueError(f"phase {self.name!r}: sampling must be one of {SAMPLINGS}, "
                       f"got {self.sampling!r}")
    self.sandwich = self.sampling == "sandwich"
    # Run at the phase's start: OFA re-sorts the expanded channels before each expand phase.
    self.sort_channels = bool(cfg.get("sort_channels", False))
    # OFA's expand_ratio_stage: > 0 sorts only inside the prefixes earlier expand phases trained.
    self.expand_stage = int(cfg.get("expand_stage", 0))
    # Scales the hidden-state and embedding distillation terms (DynaBERT: 0.1 in its width
    # stage, 1.0 in its width-and-depth stage).
    self.hidden_scale = float(cfg.get("hidden_scale", 1.0))
    restrict = {k: list(v) for k, v in dict(cfg.get("restrict", {})).items()}
    self.space = space.restrict(**restrict) if restrict else space
    self.uniform = tuple(cfg.get("uniform", ()) or ())
    unknown = [n for n in self.uniform if n not in space.names]
    if unknown:
      raise ValueError(f"phase {self.name!r}: uniform leaves {unknown} are not in the space; "
                       f"its leaves are {list(space.names)}")
    self.family = self._family(cfg.get("multipliers", ()) or ())
    self.num_subnets = (len(self.family) if self.sampling == "all"
                        else int(cfg.get("num_subnets", 1)))
    if self.sampling == "all" and cfg.get("num_subnets") not in (None, self.num_subnets):
      raise ValueError(f"phase {self.name!r}: sampling='all' runs its {self.num_subnets} "
                       f"subnets each step; drop num_subnets or set it to {self.num_subnets}")
    if self.sandwich and self.num_subnets < 2:
      raise ValueError(f"phase {self.name!r}: the sandwich rule needs num_subnets >= 2")

  def _family(self, multipliers) -> list[dict]:
    """The archs uniform slots draw from (or, for sampling='all', every arch a step runs)."""
    if self.sampling == "all":
      if not self.uniform or not multipliers:
        raise ValueError(f"phase {self.name!r}: sampling='all' needs 'uniform' (the leaves one "
                         "multiplier scales, e.g. ['heads', 'ffn']) and 'multipliers' (e.g. "
                         "[1.0, 0.75, 0.5, 0.25])")
      family = enumerate_family(self.space, self.uniform, multipliers)
      if len(family) > FAMILY_SIZE:
        raise ValueError(f"phase {self.name!r}: sampling='all' would run {len(family)} subnets "
                         f"per step; at most {FAMILY_SIZE}")
      return family
    if not self.uniform:
      return []
    grid = multipliers or np.linspace(self.space.lowest_multiplier(self.uniform), 1.0,
                                      FAMILY_SIZE)
    return [self.space.uniform(float(m), self.uniform) for m in grid]

  def as_data(self) -> dict:
    family = self.family or [self.space.largest()]
    rows = [family[i % len(family)] for i in range(FAMILY_SIZE)]
    stacked = {k: jnp.asarray(np.stack([np.asarray(r[k]) for r in rows]), jnp.int32)
               for k in family[0]}
    from_family = {k: jnp.bool_(self.sampling == "all" or k in self.uniform)
                   for k in self.space.names}
    return {"tables": self.space.tables(), "largest": self.space.largest(),
            "smallest": self.space.smallest(), "num_subnets": jnp.int32(self.num_subnets),
            "sandwich": jnp.bool_(self.sandwich), "family": stacked,
            "family_size": jnp.int32(len(family)), "from_family": from_family,
            "enumerate": jnp.bool_(self.sampling == "all"),
            "hidden_scale": jnp.float32(self.hidden_scale)}


def enumerate_family(space, uniform, multipliers) -> list[dict]:
  """Every (other leaves' values) x (multiplier) arch, largest first, as DynaBERT loops: depth
  in the outer loop, width in the inner. Leaves not in ``uniform`` must be scalars (depth) or
  fixed by the phase's restriction."""
  others = []
  for leaf in space.leaves:
    if leaf.name in uniform:
      continue
    allowed = space.allowed_values(leaf.name) if leaf.shape == () else None
    if leaf.shape == () and len(allowed) > 1:
      others.append((leaf.name, sorted(allowed, reverse=True)))
    elif leaf.shape != () and not space.fixed(leaf.name):
      raise ValueError(f"sampling='all' enumerates scalar leaves only, but {leaf.name!r} (shape "
                       f"{leaf.shape}) has several allowed values: add it to 'uniform' or fix "
                       "it with 'restrict'")
  family = []
  for combo in itertools.product(*[values for _, values in others]):
    base = dict(space.largest())
    base.update({name: np.asarray(v) for (name, _), v in zip(others, combo)})
    for m in sorted(multipliers, reverse=True):
      family.append(space.uniform(float(m), uniform, base))
  return family


def sample_archs(space, key: jax.Array, phase: dict, num: int) -> dict:
  """``num`` archs stacked on a leading axis, from the phase's space: per-position random
  values, the ``uniform`` leaves from the family, or the family itself (sampling='all'); under
  the sandwich rule arch 0 is the phase's largest and arch 1 its smallest."""
  archs = jax.vmap(lambda k: space.sample(k, phase["tables"]))(jax.random.split(key, num))
  # A key of its own, so phases without a family draw exactly the archs they always drew.
  pick = jax.random.randint(jax.random.fold_in(key, 1), (num,), 0, phase["family_size"])
  index = jnp.where(phase["enumerate"], jnp.arange(num) % FAMILY_SIZE, pick)
  archs = {k: jnp.where(phase["from_family"][k], phase["family"][k][index], v)
           for k, v in archs.items()}
  if num < 2:
    return archs

  def sandwich(leaf, big, small):
    on = phase["sandwich"]
    return leaf.at[0].set(jnp.where(on, big, leaf[0])).at[1].set(jnp.where(on, small, leaf[1]))

  return jax.tree.map(sandwich, archs, phase["largest"], phase["smallest"])
