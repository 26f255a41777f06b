"""Search spaces: architectures as small pytrees of int32 arrays.

An *arch* is a dict ``{leaf_name: int32 array}``; a :class:`SearchSpace` knows, for every leaf,
its shape and the values each position may take. Everything that changes between training
phases (progressive-shrinking restrictions, CompOFA's coupling) lives in :meth:`SearchSpace.tables`,
a pytree of arrays whose structure never changes for a given space, so a jitted function that
takes the tables as an argument serves every phase with one compilation.

Two relations between leaves keep the space honest about what is a *distinct* subnet:

* **gating**: position ``[..., i]`` of a gated leaf only matters when ``i < parent[...]``
  (OFA: the kernel / expand of block ``i`` of a stage only matter if the stage's depth exceeds
  ``i``). Cardinality, names and :meth:`canonicalize` ignore gated-off positions.
* **coupling**: the values a child position may take depend on its parent's value through a
  boolean table ``[parent values, child values]`` (CompOFA: expand is 3 / 4 / 6 when depth is
  2 / 3 / 4). An all-true table means "no coupling"; the table is data, so coupling costs no
  recompilation either.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Arch = dict  # {leaf name: int32 array}


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One named int32 leaf of an arch.

  Attributes:
    name: key in the arch dict.
    shape: array shape of the leaf.
    values: every value the leaf can ever take, sorted ascending (the columns of its masks).
    parent: name of a leaf whose shape is a prefix of this one's (``shape == parent.shape +
      (n,)``); required for ``gated`` and for coupling.
    gated: position ``[..., i]`` is active only when ``i < arch[parent][...]``.
    gate: for a gated leaf, another rule than that prefix: ``gate[j][i]`` says whether position
      ``[..., i]`` is active when the parent takes its ``j``-th value (DynaBERT's depth keeps
      layers spread over the stack, not the first ones).
  """
  name: str
  shape: tuple[int, ...]
  values: tuple[int, ...]
  parent: str | None = None
  gated: bool = False
  gate: tuple[tuple[bool, ...], ...] | None = None


class SearchSpace:
  """A static, hashable description of a family of subnets.

  Args:
    leaves: the leaves, parents before children.
    allowed: optional ``{name: bool array [*shape, len(values)]}``; default all allowed.
    coupling: optional ``{name: bool array [len(parent.values), len(values)]}`` for leaves with
      a parent; default all true (no coupling).
    resolutions: input resolutions the space is trained for (static: one compile each).
  """

  def __init__(self, leaves: Sequence[Leaf], allowed: Mapping[str, Any] | None = None,
               coupling: Mapping[str, Any] | None = None, resolutions: Sequence[int] = (224,)):
    self.leaves = tuple(leaves)
    self.resolutions = tuple(int(r) for r in resolutions)
    names = [leaf.name for leaf in self.leaves]
    if len(set(names)) != len(names):
      raise ValueError(f"leaf names must be unique, got {names}")
    by_name = {}
    for leaf in self.leaves:
      if tuple(sorted(set(leaf.values))) != tuple(leaf.values):
        raise ValueError(f"leaf {leaf.name!r}: values must be sorted and unique, got {leaf.values}")
      if leaf.parent is not None:
        parent = by_name.get(leaf.parent)
        if parent is None:
          raise ValueError(f"leaf {leaf.name!r}: parent {leaf.parent!r} must be declared before it")
        if parent.parent is not None:
          raise ValueError(f"leaf {leaf.name!r}: parent {leaf.parent!r} must itself have no parent")
        if leaf.shape[:-1] != parent.shape or len(leaf.shape) != len(parent.shape) + 1:
          raise ValueError(f"leaf {leaf.name!r}: shape {leaf.shape} must be parent shape "
                           f"{parent.shape} plus one axis")
      elif leaf.gated:
        raise ValueError(f"leaf {leaf.name!r}: gated leaves need a parent")
      if leaf.gate is not None:
        parent = by_name.get(leaf.parent)
        if not leaf.gated or np.shape(leaf.gate) != (len(parent.values), leaf.shape[-1]):
          raise ValueError(f"leaf {leaf.name!r}: gate must be a gated leaf's [parent values, "
                           f"{leaf.shape[-1]}] table, got shape {np.shape(leaf.gate)}")
      by_name[leaf.name] = leaf
    self._by_name = by_name
    allowed = dict(allowed or {})
    coupling = dict(coupling or {})
    unknown = (set(allowed) | set(coupling)) - set(names)
    if unknown:
      raise ValueError(f"unknown leaves {sorted(unknown)}; leaves are {names}")
    self._allowed = {}
    self._coupling = {}
    for leaf in self.leaves:
      mask = np.ones(leaf.shape + (len(leaf.values),), bool)
      if leaf.name in allowed:
        mask = np.broadcast_to(np.asarray(allowed[leaf.name], bool), mask.shape).copy()
      if not mask.any(-1).all():
        bad = np.argwhere(~mask.any(-1))[0]
        raise ValueError(f"leaf {leaf.name!r} position {tuple(int(i) for i in bad)} allows no value")
      mask.setflags(write=False)
      self._allowed[leaf.name] = mask
      if leaf.parent is not None:
        n_parent = len(by_name[leaf.parent].values)
        table = np.ones((n_parent, len(leaf.values)), bool)
        if leaf.name in coupling:
          table = np.broadcast_to(np.asarray(coupling[leaf.name], bool), table.shape).copy()
        table.setflags(write=False)
        self._coupling[leaf.name] = table
      elif leaf.name in coupling:
        raise ValueError(f"leaf {leaf.name!r} has no parent, so it cannot be coupled")
    self._largest_host = None  # filled on first use by canonical_host
    self._key = (self.leaves, self.resolutions,
                 tuple((k, v.tobytes()) for k, v in self._allowed.items()),
                 tuple((k, v.tobytes()) for k, v in self._coupling.items()))

  # ---------------------------------------------------------------- identity
  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, SearchSpace) and self._key == other._key

  def __repr__(self):
    parts = ", ".join(f"{l.name}{list(l.shape)}" for l in self.leaves)
    return f"SearchSpace({parts}; {self.cardinality():.4g} subnets)"

  def leaf(self, name: str) -> Leaf:
    return self._by_name[name]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(l.name for l in self.leaves)

  def allowed_values(self, name: str, position: tuple[int, ...] = ()) -> tuple[int, ...]:
    leaf = self._by_name[name]
    mask = self._allowed[name][position] if position else self._allowed[name].any(
        axis=tuple(range(len(leaf.shape))))
    return tuple(v for v, ok in zip(leaf.values, np.atleast_1d(mask)) if ok)

  def choices(self, name: str, position: tuple[int, ...] = (), parent_value: int | None = None
              ) -> tuple[int, ...]:
    """The values one position may take: its allowed values, and for a coupled leaf those its
    parent's value permits (host-side; search mutations and moves use it)."""
    leaf = self._by_name[name]
    mask = self._allowed[name][tuple(position)]
    if leaf.parent is not None and parent_value is not None:
      parent = self._by_name[leaf.parent]
      mask = mask & self._coupling[name][parent.values.index(int(parent_value))]
    return tuple(v for v, ok in zip(leaf.values, mask) if ok)

  def active(self, arch: Mapping[str, Any], name: str) -> np.ndarray:
    """Bool mask of the positions of leaf ``name`` that matter in ``arch`` (gating)."""
    leaf = self._by_name[name]
    return self._active(leaf, np.asarray(arch[leaf.parent])) if leaf.gated else np.ones(
        leaf.shape, bool)

  # ---------------------------------------------------------------- tables (traced data)
  def tables(self) -> dict:
    """The space's restriction and coupling as arrays: pass them into jit as data."""
    return {"allowed": {k: jnp.asarray(v) for k, v in self._allowed.items()},
            "coupling": {k: jnp.asarray(v) for k, v in self._coupling.items()}}

  # ---------------------------------------------------------------- derived spaces
  def restrict(self, **allowed_values) -> "SearchSpace":
    """A subspace: ``restrict(kernel=[3, 5, 7], depth=[3, 4])``.

    Each value is a list of allowed values for every position, or a nested list / array with
    list of allowed-value lists whose leading axes are a prefix of the leaf's shape
    (``kernel=[[3], [5], [3], [3], [5]]``: one kernel per stage, broadcast over its blocks).
    """
    new_allowed = dict(self._allowed)
    for name, spec in allowed_values.items():
      if name not in self._by_name:
        raise ValueError(f"unknown leaf {name!r}; leaves are {list(self.names)}")
      leaf = self._by_name[name]
      mask = _values_to_mask(leaf, spec)
      new_allowed[name] = self._allowed[name] & mask
    return SearchSpace(self.leaves, new_allowed, self._coupling, self.resolutions)

  def couple(self, child: str, mapping: Mapping[int, Sequence[int] | int]) -> "SearchSpace":
    """Couple ``child`` to its parent: ``couple("expand", {2: 3, 3: 4, 4: 6})`` (CompOFA)."""
    leaf = self._by_name.get(child)
    if leaf is None or leaf.parent is None:
      raise ValueError(f"{child!r} is not a leaf with a parent; leaves are {list(self.names)}")
    parent = self._by_name[leaf.parent]
    table = np.zeros((len(parent.values), len(leaf.values)), bool)
    for pv, cvs in mapping.items():
      if pv not in parent.values:
        raise ValueError(f"couple: {pv} is not a value of {parent.name!r} {parent.values}")
      for cv in np.atleast_1d(cvs):
        if int(cv) not in leaf.values:
          raise ValueError(f"couple: {cv} is not a value of {child!r} {leaf.values}")
        table[parent.values.index(pv), leaf.values.index(int(cv))] = True
    coupling = dict(self._coupling)
    coupling[child] = table
    # Parent values without a mapping are no longer reachable.
    allowed = dict(self._allowed)
    reachable = np.isin(np.asarray(parent.values), list(mapping))
    allowed[parent.name] = self._allowed[parent.name] & reachable
    return SearchSpace(self.leaves, allowed, coupling, self.resolutions)

  # ---------------------------------------------------------------- special archs
  def largest(self) -> Arch:
    return self._extreme(last=True)

  def smallest(self) -> Arch:
    return self._extreme(last=False)

  def _extreme(self, last: bool) -> Arch:
    arch = {}
    for leaf in self.leaves:
      mask = self._allowed[leaf.name]
      if leaf.parent is not None:
        parent = self._by_name[leaf.parent]
        pidx = np.searchsorted(parent.values, arch[leaf.parent])
        mask = mask & self._coupling[leaf.name][pidx][..., None, :]
      # index of the last (largest) or first (smallest) allowed value
      idx = mask.shape[-1] - 1 - np.argmax(mask[..., ::-1], -1) if last else np.argmax(mask, -1)
      arch[leaf.name] = np.asarray(leaf.values, np.int32)[idx]
    return {k: jnp.asarray(v) for k, v in arch.items()}

  def uniform(self, multiplier: float, names: Sequence[str], base: Mapping[str, Any] | None = None
              ) -> dict[str, np.ndarray]:
    """One width multiplier for the whole network (US-Nets, DynaBERT), on the host: every
    position of the leaves ``names`` takes the allowed value nearest to ``multiplier`` x its
    largest allowed value (ties go to the larger); the other leaves come from ``base``
    (default: the largest arch)."""
    base = self.largest() if base is None else base
    arch = {k: np.asarray(v, np.int64) for k, v in base.items()}
    for name in names:
      values = np.asarray(self.leaf(name).values, np.float64)
      mask = self._allowed[name]
      _, largest = self._allowed_range(name)
      distance = np.where(mask, np.abs(values - multiplier * largest[..., None]), np.inf)
      # reversed argmin: among equal distances, the larger value
      idx = len(values) - 1 - np.argmin(distance[..., ::-1], -1)
      arch[name] = values.astype(np.int64)[idx]
    return arch

  def lowest_multiplier(self, names: Sequence[str]) -> float:
    """The smallest multiplier :meth:`uniform` tells apart: below it every position of the
    leaves ``names`` is at its smallest allowed value."""
    return float(min((low / high).min() for low, high in map(self._allowed_range, names)))

  def fixed(self, name: str) -> bool:
    """Whether every position of leaf ``name`` allows exactly one value."""
    return bool((self._allowed[name].sum(-1) == 1).all())

  def _allowed_range(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per position, the smallest and the largest allowed value (float64)."""
    values, mask = np.asarray(self.leaf(name).values, np.float64), self._allowed[name]
    return np.where(mask, values, np.inf).min(-1), np.where(mask, values, -np.inf).max(-1)

  # ---------------------------------------------------------------- sampling (pure JAX)
  def sample(self, key: jax.Array, tables: dict | None = None) -> Arch:
    """A uniformly random value per position (as OFA samples), inside jit/vmap/scan.

    ``tables`` defaults to this space's own; pass them explicitly to switch phases without
    recompiling.
    """
    tables = self.tables() if tables is None else tables
    keys = jax.random.split(key, len(self.leaves))
    arch = {}
    for k, leaf in zip(keys, self.leaves):
      mask = tables["allowed"][leaf.name]
      if leaf.parent is not None:
        parent = self._by_name[leaf.parent]
        pidx = jnp.searchsorted(jnp.asarray(parent.values), arch[leaf.parent])
        mask = mask & tables["coupling"][leaf.name][pidx][..., None, :]
      logits = jnp.where(mask, 0.0, -jnp.inf)
      idx = jax.random.categorical(k, logits, axis=-1)
      arch[leaf.name] = jnp.asarray(leaf.values, jnp.int32)[idx]
    return arch

  # ---------------------------------------------------------------- validation (host)
  def validate(self, arch: Mapping[str, Any]) -> Arch:
    """Checks an arch on the host; returns it as int32 arrays or raises a clear ValueError."""
    return {k: jnp.asarray(v, jnp.int32) for k, v in self.check_host(arch).items()}

  def check_host(self, arch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:meth:`validate` without leaving numpy (int64 arrays): for host loops over many archs."""
    if not isinstance(arch, Mapping):
      raise ValueError(f"an arch must be a dict with leaves {list(self.names)}, got {type(arch).__name__}")
    missing = [n for n in self.names if n not in arch]
    extra = [n for n in arch if n not in self._by_name]
    if missing or extra:
      raise ValueError(f"arch leaves must be exactly {list(self.names)}; missing {missing}, unexpected {extra}")
    out = {}
    for leaf in self.leaves:
      try:
        value = np.asarray(arch[leaf.name])
      except jax.errors.TracerArrayConversionError:  # under jit / vmap / grad: no values yet
        raise ValueError(f"validate() runs on the host; leaf {leaf.name!r} is a traced value"
                         ) from None
      if value.dtype == bool or not (np.issubdtype(value.dtype, np.integer) or
                                     np.issubdtype(value.dtype, np.floating)):
        raise ValueError(f"leaf {leaf.name!r} must hold integers, got dtype {value.dtype}")
      if np.issubdtype(value.dtype, np.floating):
        if not np.all(np.isfinite(value)) or not np.all(value == np.round(value)):
          raise ValueError(f"leaf {leaf.name!r} must hold integers, got {value.tolist()}")
      if value.shape != leaf.shape:
        raise ValueError(f"leaf {leaf.name!r} must have shape {leaf.shape}, got {value.shape}")
      value = value.astype(np.int64)
      mask = self._allowed[leaf.name]
      if leaf.parent is not None:
        parent = self._by_name[leaf.parent]
        pidx = np.searchsorted(parent.values, out[leaf.parent])
        mask = mask & self._coupling[leaf.name][pidx][..., None, :]
        active = self._active(leaf, out[leaf.parent])
      else:
        active = np.ones(leaf.shape, bool)
      for pos in zip(*np.nonzero(active)) if leaf.shape else [()]:
        v = int(value[pos])
        ok = v in leaf.values and mask[pos][leaf.values.index(v)]
        if not ok:
          allowed = [lv for lv, m in zip(leaf.values, mask[pos]) if m]
          where = f" at position {tuple(int(i) for i in pos)}" if pos else ""
          why = ""
          if leaf.parent is not None and v in leaf.values and self._allowed[leaf.name][pos][
              leaf.values.index(v)]:
            ppos = tuple(int(i) for i in pos[:-1])
            why = f" when {leaf.parent}{list(ppos)} = {int(out[leaf.parent][ppos])}"
          raise ValueError(f"leaf {leaf.name!r}{where}: value {v} is not allowed{why}; "
                           f"allowed values are {allowed}")
      out[leaf.name] = value
    return out

  def _active(self, leaf: Leaf, parent_value: np.ndarray) -> np.ndarray:
    if not leaf.gated:
      return np.ones(leaf.shape, bool)
    if leaf.gate is not None:
      parent = self._by_name[leaf.parent]
      index = np.searchsorted(parent.values, np.asarray(parent_value))
      return np.asarray(leaf.gate, bool)[index]
    return np.arange(leaf.shape[-1]) < np.asarray(parent_value)[..., None]

  def _active_positions(self, leaf: Leaf, parent_value: int) -> list[int]:
    """Positions along a child's last axis that a parent value leaves active."""
    return [int(i) for i in np.nonzero(self._active(leaf, np.asarray(parent_value)))[0]]

  def canonicalize(self, arch: Mapping[str, Any]) -> Arch:
    """Sets gated-off positions to the largest allowed value, so equal subnets compare equal."""
    return {k: jnp.asarray(v, jnp.int32) for k, v in self.canonical_host(arch).items()}

  def canonical_host(self, arch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:meth:`canonicalize` in numpy (int64 arrays)."""
    arch = {k: np.asarray(v, np.int64) for k, v in arch.items()}
    if self._largest_host is None:
      self._largest_host = {k: np.asarray(v, np.int64) for k, v in self.largest().items()}
    for leaf in self.leaves:
      if leaf.gated:
        active = self._active(leaf, arch[leaf.parent])
        arch[leaf.name] = np.where(active, arch[leaf.name], self._largest_host[leaf.name])
    return arch

  # ---------------------------------------------------------------- host-side edits (search)
  def to_host(self, arch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A numpy (int64) copy of ``arch``: searches edit archs in place and cost them on the host,
    where a device array per leaf would cost a transfer each time."""
    return {k: np.array(v, np.int64) for k, v in arch.items()}

  def repair(self, arch: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """``arch`` after an edit (mutation, crossover, a shrink move), made valid again if it can
    be: a coupled child whose parent changed takes the largest value its parent now permits
    that is not above its own (else the smallest permitted), then gated-off positions are
    canonicalised so that equal subnets compare equal (names are the searches' cache keys).
    Returns None if the result is still invalid (e.g. a value the space's restriction forbids).
    """
    arch = self.to_host(arch)
    try:
      for leaf in self.leaves:
        if leaf.parent is None:
          continue
        parent = arch[leaf.parent]
        for pos in np.ndindex(*leaf.shape):
          # choices() raises ValueError for a parent value the space never takes.
          allowed = self.choices(leaf.name, pos, int(parent[pos[:-1]]))
          if allowed and int(arch[leaf.name][pos]) not in allowed:
            below = [v for v in allowed if v <= arch[leaf.name][pos]]
            arch[leaf.name][pos] = below[-1] if below else allowed[0]
      return self.canonical_host(self.check_host(arch))
    except ValueError:
      return None

  def random_host(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A uniformly random value per position, like :meth:`sample` but on the host from a numpy
    generator (searches draw thousands of archs in Python loops; no compile, no transfer)."""
    arch = {}
    for leaf in self.leaves:
      value = np.zeros(leaf.shape, np.int64)
      for pos in np.ndindex(*leaf.shape):
        parent = None if leaf.parent is None else int(arch[leaf.parent][pos[:-1]])
        value[pos] = rng.choice(self.choices(leaf.name, pos, parent))
      arch[leaf.name] = value
    return self.repair(arch)

  # ---------------------------------------------------------------- counting
  def _position_choices(self, leaf: Leaf, pos: tuple[int, ...], parent_value: int | None) -> int:
    mask = self._allowed[leaf.name][pos]
    if parent_value is not None:
      parent = self._by_name[leaf.parent]
      mask = mask & self._coupling[leaf.name][parent.values.index(parent_value)]
    return int(mask.sum())

  def cardinality(self) -> int:
    """The exact number of distinct subnets (gated-off positions do not multiply)."""
    children = {l.name: [c for c in self.leaves if c.parent == l.name] for l in self.leaves}
    total = 1
    for leaf in self.leaves:
      if leaf.parent is not None:
        continue
      for pos in np.ndindex(*leaf.shape):
        count = 0
        for v in self.allowed_values(leaf.name, pos):
          sub = 1
          for child in children[leaf.name]:
            for i in self._active_positions(child, v):
              sub *= self._position_choices(child, pos + (i,), v)
          count += sub
        total *= count
    return total

  def enumerate(self, limit: int = 100_000) -> list[Arch]:
    """Every distinct subnet (canonical form), for small spaces."""
    n = self.cardinality()
    if n > limit:
      raise ValueError(f"the space has {n} subnets, more than limit={limit}; use sample()")
    children = {l.name: [c for c in self.leaves if c.parent == l.name] for l in self.leaves}
    big = {k: np.asarray(v) for k, v in self.largest().items()}
    per_root = []  # per root position: list of {leaf: {pos: value}} partial assignments
    for leaf in self.leaves:
      if leaf.parent is not None:
        continue
      for pos in np.ndindex(*leaf.shape):
        options = []
        for v in self.allowed_values(leaf.name, pos):
          slots, choices = [], []
          for child in children[leaf.name]:
            for i in self._active_positions(child, v):
              cpos = pos + (i,)
              mask = self._allowed[child.name][cpos] & self._coupling[child.name][
                  self._by_name[leaf.name].values.index(v)]
              slots.append((child.name, cpos))
              choices.append([cv for cv, m in zip(child.values, mask) if m])
          for combo in itertools.product(*choices):
            assign = {(leaf.name, pos): v}
            assign.update(dict(zip(slots, combo)))
            options.append(assign)
        per_root.append(options)
    archs = []
    for combo in itertools.product(*per_root):
      arch = {k: v.copy() for k, v in big.items()}
      for assign in combo:
        for (name, pos), v in assign.items():
          arch[name][pos] = v
      archs.append({k: jnp.asarray(v, jnp.int32) for k, v in arch.items()})
    return archs

  # ---------------------------------------------------------------- serialisation
  def to_json(self, arch: Mapping[str, Any]) -> str:
    arch = self.validate(arch)
    return json.dumps({k: np.asarray(v).tolist() for k, v in arch.items()})

  def from_json(self, text: str) -> Arch:
    try:
      raw = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"arch JSON is not valid JSON: {e}") from None
    return self.validate(raw)

  def name(self, arch: Mapping[str, Any]) -> str:
    """A short readable name: leaf initial + active values, stages separated by '.'.

    e.g. ``d2342-k35.777.3.55.35-e...`` for OFA; multi-digit values are joined by '_'.
    """
    arch = {k: np.asarray(v) for k, v in arch.items()}
    parts = []
    for leaf in self.leaves:
      value = arch[leaf.name]
      sep = "" if max(leaf.values) < 10 else "_"
      if leaf.gated:
        active = self._active(leaf, arch[leaf.parent])
        rows = [sep.join(str(int(x)) for x, a in zip(row, act) if a)
                for row, act in zip(value.reshape(-1, leaf.shape[-1]), active.reshape(-1, leaf.shape[-1]))]
        body = ".".join(rows)
      elif value.ndim >= 2:
        body = ".".join(sep.join(str(int(x)) for x in row) for row in value.reshape(-1, leaf.shape[-1]))
      else:
        body = sep.join(str(int(x)) for x in value.reshape(-1))
      parts.append(leaf.name[0] + body)
    return "-".join(parts)


def _values_to_mask(leaf: Leaf, spec) -> np.ndarray:
  """Turns a restriction spec (flat list, or one list per position) into a bool mask."""
  values = np.asarray(leaf.values)
  if np.ndim(spec) == 1 or isinstance(spec, (int, np.integer)) or (
      isinstance(spec, (list, tuple)) and all(np.ndim(s) == 0 for s in spec)):
    flat = np.atleast_1d(np.asarray(spec))
    bad = [int(v) for v in flat if int(v) not in leaf.values]
    if bad:
      raise ValueError(f"restrict {leaf.name!r}: values {bad} are not among {leaf.values}")
    return np.isin(values, flat)
  # One list of allowed values per position (last axis); leading axes are a prefix of the
  # leaf's shape and broadcast over the rest (e.g. one kernel list per stage).
  rows = np.asarray(spec)
  if rows.ndim - 1 > len(leaf.shape) or rows.shape[:-1] != leaf.shape[:rows.ndim - 1]:
    raise ValueError(f"restrict {leaf.name!r}: per-position spec of shape {rows.shape} must be "
                     f"(prefix of {leaf.shape}) + (allowed values,)")
  for v in np.unique(rows):
    if int(v) not in leaf.values:
      raise ValueError(f"restrict {leaf.name!r}: value {int(v)} is not among {leaf.values}")
  mask = (rows[..., :, None] == values).any(-2)
  lead = mask.shape[:-1]
  mask = mask.reshape(lead + (1,) * (len(leaf.shape) - len(lead)) + (len(values),))
  return np.broadcast_to(mask, leaf.shape + (len(values),))

