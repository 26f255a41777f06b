"""Published once-for-all PyTorch supernets <-> ofajax variables.

Reads a state dict (``torch.load(path)["state_dict"]`` of ``ofa_mbv3_d234_e346_k357_w1.0``,
``..._w1.2`` or ``ofa_resnet50``, as once-for-all's ``ofa/model_zoo.py`` loads them) into
``{"params", "batch_stats"}`` of the matching ofajax supernet, and writes such variables back as a
state dict with once-for-all's key names. Every tensor is accounted for: a key that maps to
nothing, a parameter without a key and a shape that does not fit are reported by name.

Key names are those of once-for-all's modules (``ofa/imagenet_classification/elastic_nn``):
elastic layers wrap their torch module once more (``DynamicConv2d.conv``,
``DynamicBatchNorm2d.bn``, ``DynamicLinear.linear``), so ``x.conv.conv.weight`` is the weight of
an elastic conv and ``x.conv.weight`` that of a static one; files saved by older versions of the
code name a MobileNet block's layer ``mobile_inverted_conv`` instead of ``conv``. once-for-all's
own ``load_state_dict`` accepts all of these spellings, and so does :func:`from_state_dict`.

Layouts: torch convs are [out, in, kh, kw] (NCHW), ofajax's [kh, kw, in, out] (NHWC); linear
layers [out, in] vs [in, out]; SE's and the feature mix's 1x1 convs become Dense kernels.
OFA's kernel-transform matrices (``7to5_matrix`` [25, 25], ``5to3_matrix`` [9, 9]) are applied
as ``F.linear(flat_kernel, M)``, i.e. ``flat @ M.T`` per channel, and ofajax applies them the
same way (``M @ flat`` on [taps, channels]), so they are copied unchanged; PaddleSlim stores the
transpose.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Iterable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ofajax.layers import transform_name
from ofajax.models.ofa_mbv3 import OFAMobileNetV3
from ofajax.models.ofa_resnet50 import OFAResNet50

# ofajax model name + options of each published supernet (once-for-all's ofa_net() ids).
PUBLISHED = {
    "ofa_mbv3_w1.0": ("ofa_mbv3", {"width_mult": 1.0}),
    "ofa_mbv3_w1.2": ("ofa_mbv3", {"width_mult": 1.2}),
    "ofa_resnet50": ("ofa_resnet50", {}),
}
OFA_NET_IDS = {"ofa_mbv3_d234_e346_k357_w1.0": "ofa_mbv3_w1.0",
               "ofa_mbv3_d234_e346_k357_w1.2": "ofa_mbv3_w1.2",
               "ofa_supernet_resnet50": "ofa_resnet50"}


class StateDictError(ValueError):
  """A state dict does not fit the supernet it is read into."""


# --------------------------------------------------------------------------- layouts


class _Layout(NamedTuple):
  to_ofajax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


_LAYOUTS = {
    # [out, in, kh, kw] <-> [kh, kw, in, out]; depthwise [C, 1, k, k] <-> [k, k, 1, C] alike.
    "conv": _Layout(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
    # a 1x1 conv on a pooled vector (SE, feature mix) is a Dense layer: [out, in, 1, 1] <-> [in, out]
    "conv_as_dense": _Layout(lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None]),
    "linear": _Layout(lambda w: w.T, lambda w: w.T),
    "same": _Layout(lambda w: w, lambda w: w),
}


class Entry(NamedTuple):
  """One tensor of the state dict: its canonical key, accepted spellings and ofajax home."""
  key: str
  aliases: tuple[str, ...]
  path: tuple[str, ...] | None   # ("params", ...) / ("batch_stats", ...); None: read and ignored
  layout: str


def _spellings(key: str, variants: Iterable[tuple[str, str]]) -> tuple[str, ...]:
  """Every spelling of ``key`` obtained by replacing any subset of the (canonical, alternative)
  substrings, each at its first occurrence."""
  variants = [v for v in variants if v[0] in key]
  out = set()
  for picks in itertools.product((0, 1), repeat=len(variants)):
    k = key
    for pick, (canonical, alternative) in zip(picks, variants):
      if pick:
        k = k.replace(canonical, alternative, 1)
    out.add(k)
  out.discard(key)
  return tuple(sorted(out))


class _Table:
  """Builds the entries of one network, prefix by prefix."""

  def __init__(self):
    self.entries: list[Entry] = []
    self.block_alias = None  # (canonical prefix, older prefix) of the current block's keys

  def add(self, key: str, path, layout: str, variants=()):
    variants = list(variants) + ([self.block_alias] if self.block_alias else [])
    self.entries.append(Entry(key, _spellings(key, variants),
                              None if path is None else tuple(path), layout))

  def conv(self, prefix: str, path, dynamic: bool, layout: str = "conv"):
    """``prefix.conv[.conv].weight`` -> path/kernel."""
    wrapped, plain = f"{prefix}.conv.conv.weight", f"{prefix}.conv.weight"
    key, alt = (wrapped, plain) if dynamic else (plain, wrapped)
    self.add(key, ("params", *path, "kernel"), layout, [(key, alt)])

  def bn(self, prefix: str, path, dynamic: bool):
    """``prefix.bn[.bn].{weight, bias, running_mean, running_var, num_batches_tracked}``."""
    wrapped, plain = f"{prefix}.bn.bn.", f"{prefix}.bn."
    base, alt = (wrapped, plain) if dynamic else (plain, wrapped)
    for name, target in (("weight", ("params", *path, "scale")), ("bias", ("params", *path, "bias")),
                         ("running_mean", ("batch_stats", *path, "mean")),
                         ("running_var", ("batch_stats", *path, "var")),
                         ("num_batches_tracked", None)):
      self.add(base + name, target, "same", [(base, alt)])

  def linear(self, prefix: str, path, dynamic: bool):
    """``prefix.linear[.linear].{weight, bias}`` -> path/{kernel, bias}."""
    wrapped, plain = f"{prefix}.linear.linear.", f"{prefix}.linear."
    base, alt = (wrapped, plain) if dynamic else (plain, wrapped)
    self.add(base + "weight", ("params", *path, "kernel"), "linear", [(base, alt)])
    self.add(base + "bias", ("params", *path, "bias"), "same", [(base, alt)])

  def conv_bn(self, prefix: str, path, dynamic: bool):
    self.conv(prefix, path, dynamic)
    self.bn(prefix, (*path, "bn"), dynamic)


# --------------------------------------------------------------------------- key tables


def _mbv3_entries(model: OFAMobileNetV3) -> list[Entry]:
  """OFAMobileNetV3: first_conv, blocks.0 (static MBConv), blocks.1..20 (DynamicMBConvLayer in
  ResidualBlock.conv), final_expand_layer, feature_mix_layer, classifier (static LinearLayer)."""
  t = _Table()
  t.conv_bn("first_conv", ("stem",), dynamic=False)
  t.block_alias = ("blocks.0.conv.", "blocks.0.mobile_inverted_conv.")
  t.conv("blocks.0.conv.depth_conv", ("first_block", "depthwise"), dynamic=False)
  t.bn("blocks.0.conv.depth_conv", ("first_block", "depthwise_bn"), dynamic=False)
  t.conv_bn("blocks.0.conv.point_linear", ("first_block", "project"), dynamic=False)
  kernels = sorted(model.kernel_choices)
  for s, i, *_, se, _, _ in model._stage_blocks():
    n, name = 1 + s * model.max_depth + i, f"stage{s}_block{i}"
    p = f"blocks.{n}.conv"
    t.block_alias = (f"blocks.{n}.conv.", f"blocks.{n}.mobile_inverted_conv.")
    t.conv_bn(f"{p}.inverted_bottleneck", (name, "expand"), dynamic=True)
    t.conv(f"{p}.depth_conv", (name, "depthwise"), dynamic=True)
    for small, large in zip(kernels[:-1], kernels[1:]):
      t.add(f"{p}.depth_conv.conv.{large}to{small}_matrix",
            ("params", name, "depthwise", transform_name(large, small)), "same")
    t.bn(f"{p}.depth_conv", (name, "depthwise_bn"), dynamic=True)
    if se:
      for fc in ("reduce", "expand"):
        t.add(f"{p}.depth_conv.se.fc.{fc}.weight", ("params", name, "se", fc, "kernel"),
              "conv_as_dense")
        t.add(f"{p}.depth_conv.se.fc.{fc}.bias", ("params", name, "se", fc, "bias"), "same")
    t.conv_bn(f"{p}.point_linear", (name, "project"), dynamic=True)
  t.block_alias = None
  t.conv_bn("final_expand_layer", ("head",), dynamic=False)
  t.conv("feature_mix_layer", ("feature_mix",), dynamic=False, layout="conv_as_dense")
  t.linear("classifier", ("classifier",), dynamic=False)
  return t.entries


def _resnet_entries(model: OFAResNet50) -> list[Entry]:
  """OFAResNets: input_stem.0 / .1 (ResidualBlock.conv) / .2 (DynamicConvLayer), blocks.0..17
  (DynamicResNetBottleneckBlock: conv1, conv2, conv3, downsample), classifier
  (DynamicLinearLayer)."""
  t = _Table()
  t.conv_bn("input_stem.0", ("stem0",), dynamic=True)
  t.conv_bn("input_stem.1.conv", ("stem1", "conv"), dynamic=True)
  t.conv_bn("input_stem.2", ("stem2",), dynamic=True)
  for n, (s, i, *_, downsample) in enumerate(model._blocks()):
    for conv in ("conv1", "conv2", "conv3") + (("downsample",) if downsample else ()):
      t.conv_bn(f"blocks.{n}.{conv}", (f"stage{s}_block{i}", conv), dynamic=True)
  t.linear("classifier", ("classifier",), dynamic=True)
  return t.entries


def _abstract_variables(model) -> dict:
  x = jnp.zeros((1, 32, 32, model.in_channels), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, model.search_space().largest()))


class KeyTable(NamedTuple):
  entries: list[Entry]
  by_spelling: dict      # any accepted key spelling -> Entry
  shapes: dict           # ofajax path -> shape


@functools.lru_cache(maxsize=8)  # models are hashable; tracing a full-size init costs seconds
def key_table(model) -> KeyTable:
  """The state-dict layout of ``model``, checked to cover every one of its variables once."""
  if isinstance(model, OFAMobileNetV3):
    if not model.kernel_transform or sorted(model.kernel_choices) != [3, 5, 7]:
      raise ValueError("once-for-all's MobileNetV3 supernets have kernels 3/5/7 with transform "
                       "matrices; this model has kernel_choices="
                       f"{model.kernel_choices}, kernel_transform={model.kernel_transform}")
    entries = _mbv3_entries(model)
  elif isinstance(model, OFAResNet50):
    entries = _resnet_entries(model)
  else:
    raise ValueError(f"no once-for-all state-dict layout for {type(model).__name__}; supported: "
                     "OFAMobileNetV3, OFAResNet50")
  abstract = _abstract_variables(model)
  shapes = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(
      {c: abstract[c] for c in ("params", "batch_stats")}).items()}
  mapped = [e.path for e in entries if e.path is not None]
  assert sorted(mapped) == sorted(shapes), (  # the tables above must track the models
      set(shapes) ^ set(mapped))
  by_spelling = {}
  for e in entries:
    for k in (e.key,) + e.aliases:
      assert k not in by_spelling, f"ambiguous key spelling {k}"
      by_spelling[k] = e
  return KeyTable(entries, by_spelling, shapes)


def _torch_shape(entry: Entry, shape: tuple) -> tuple:
  return tuple(_LAYOUTS[entry.layout].to_torch(np.empty(shape, np.float32)).shape)


# --------------------------------------------------------------------------- model detection


def detect_published(state_dict) -> str | None:
  """Which published supernet a state dict holds ("ofa_mbv3_w1.0", ...), or None."""
  state_dict = _strip_module_prefix(state_dict)
  if any(k.startswith("input_stem.") for k in state_dict):
    return "ofa_resnet50"
  for k in ("first_conv.conv.weight", "first_conv.conv.conv.weight"):
    if k in state_dict:  # MobileNetV3's stem: 16 channels at width 1.0, 24 at 1.2
      return {16: "ofa_mbv3_w1.0", 24: "ofa_mbv3_w1.2"}.get(int(np.shape(state_dict[k])[0]))
  return None


def _strip_module_prefix(state_dict) -> dict:
  """DataParallel / DistributedDataParallel checkpoints prefix every key with 'module.'."""
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


# --------------------------------------------------------------------------- conversion


def _listing(items: list[str], limit: int = 12) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def from_state_dict(state_dict, model, expected: str | None = None) -> dict:
  """A once-for-all state dict (name -> array) -> ofajax ``{"params", "batch_stats"}``.

  ``expected`` (e.g. "ofa_mbv3_w1.0") names the published supernet the caller asked for; a
  state dict recognisably of another one is refused before anything else is checked. Raises
  :class:`StateDictError` naming unexpected keys, missing keys and shape mismatches.
  """
  state_dict = _strip_module_prefix(state_dict)
  found = detect_published(state_dict)
  if expected is not None and found is not None and found != expected:
    raise StateDictError(f"this state dict holds the {found} supernet, not {expected}; "
                         f"convert it with --model {found}")
  table = key_table(model)
  values, unexpected, mismatched = {}, [], []
  for key, value in state_dict.items():
    entry = table.by_spelling.get(key)
    if entry is None:
      unexpected.append(key)
      continue
    if entry.key in values:
      raise StateDictError(f"{key} and another spelling of it ({entry.key}) are both present")
    values[entry.key] = (key, entry, value)
  missing = [e.key for e in table.entries if e.path is not None and e.key not in values]
  for key, entry, value in values.values():
    if entry.path is None:
      continue
    want = _torch_shape(entry, table.shapes[entry.path])
    if tuple(np.shape(value)) != want:
      mismatched.append(f"{key}: expected {want}, got {tuple(np.shape(value))}")
  if unexpected or missing or mismatched:
    parts = []
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected keys: {_listing(sorted(unexpected))}")
    if missing:
      parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if mismatched:
      parts.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched, 8)}")
    what = type(model).__name__ + (f" ({expected})" if expected else "")
    raise StateDictError(f"the state dict does not fit {what}: " + "; ".join(parts))
  flat = {}
  for key, entry, value in values.values():
    if entry.path is not None:
      array = np.asarray(value, np.float32)
      flat[entry.path] = jnp.asarray(_LAYOUTS[entry.layout].to_ofajax(array))
  return flax.traverse_util.unflatten_dict(flat)


def to_state_dict(variables: dict, model) -> dict:
  """ofajax variables -> a once-for-all state dict (canonical key names, torch layouts, float32;
  ``num_batches_tracked`` = 0), loadable by once-for-all's ``load_state_dict``."""
  table = key_table(model)
  flat = flax.traverse_util.flatten_dict({c: variables[c] for c in ("params", "batch_stats")})
  out = {}
  for e in table.entries:
    if e.path is None:
      out[e.key] = np.zeros((), np.int64)
    else:
      out[e.key] = np.ascontiguousarray(
          _LAYOUTS[e.layout].to_torch(np.asarray(flat[e.path], np.float32)))
  return out


# --------------------------------------------------------------------------- reading files


def load_state_dict(path: str, allow_pickle: bool = False) -> dict:
  """Reads ``path`` into {name: numpy array}.

  ``.npz``: the arrays as stored. Anything else is a PyTorch checkpoint read with ``torch.load``
  (torch is needed only here); its ``["state_dict"]`` is used when present, as once-for-all's
  ``ofa_net`` does. Only tensors and plain containers are unpickled unless ``allow_pickle``.
  """
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch
  except ImportError:
    raise ImportError(
        f"reading the PyTorch checkpoint {path} needs torch (used only to read the file): "
        "pip install torch --index-url https://download.pytorch.org/whl/cpu") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:  # noqa: BLE001 -- torch raises several kinds; say what to do
    raise ValueError(f"torch.load({path!r}) failed ({type(e).__name__}: {e}). If the file comes "
                     "from a source you trust and holds Python objects besides tensors, "
                     "retry with --allow_pickle.") from e
  if isinstance(obj, dict) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}
