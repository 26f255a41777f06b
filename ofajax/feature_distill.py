"""Intermediate-feature distillation through learned 1x1 adapters (GAN Compression).

The student's output at each named layer is mapped by a learned 1x1 conv (an *adapter*) to the
teacher's width at the same layer, and pulled towards the teacher's output by a mean squared
error. Adapters exist because the student's layers are narrower than the teacher's (after
pruning, or in a subnet). A subnet's inactive channels are zero in its features (masked
execution zeroes them), so one adapter over the student's full width serves every subnet.

Layers are named by their module path in the user's model ("block2", "up1"), the paths that
``feature_names`` lists; a name that is not one raises an error listing them. Any supernet whose
forward is a flax module works: the ``ofajax.elasticize`` ones (the user's model under "net"),
and the built-in ones. Both the GAN step (``ofajax.gan.step``) and the classifier step
(``ofajax.train_step``) distil through :func:`apply_with_features`.

A layer is refused (:func:`feature_shapes`) when one adapter could not read it in every subnet:
inside a block some subnets skip (elastic depth: the feature does not exist there), or inside
an elastic block that active-size execution runs at the subnet's width (its shape changes).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ofajax.elastic.plan import NET
from ofajax.elastic.supernet import ElasticNet

INTERMEDIATES = "intermediates"


def _prefix(model) -> tuple[str, ...]:
  """The path of the user's module inside the supernet (NET for an elasticized model)."""
  return (NET,) if isinstance(model, ElasticNet) else ()


def parse_names(value) -> tuple[str, ...]:
  """Layer names from a config: a tuple / list or a comma-separated string. Items are split at
  commas too: ``--config.distill_features=block1,block3`` overrides a tuple with the one item
  "block1,block3". Blanks are dropped."""
  items = [value] if isinstance(value, str) else list(value or ())
  return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


def capture_filter(model, names: Sequence[str]):
  """A ``capture_intermediates`` filter keeping the outputs of the modules ``names`` names."""
  wanted = {_prefix(model) + tuple(n.split("/")) for n in names}
  return lambda module, method: method == "__call__" and tuple(module.path) in wanted


def collect(model, intermediates: dict, names: Sequence[str]) -> dict:
  """{name: the module's output} from a ``capture_intermediates`` collection."""
  out = {}
  for name in names:
    node = intermediates
    for part in _prefix(model) + tuple(name.split("/")):
      node = node[part]
    out[name] = node["__call__"][0]
  return out


def apply_with_features(model, variables: dict, x, arch, names: Sequence[str], *,
                        mutable=(), **kwargs):
  """``model.apply(variables, x, arch, **kwargs)`` that also returns the outputs of the layers
  ``names`` names: (output, {name: feature}), or ((output, features), updated collections)
  when ``mutable`` names collections, as ``apply`` returns them. No names: a plain apply."""
  mutable = list(mutable)
  if not names:
    result = model.apply(variables, x, arch, mutable=mutable or False, **kwargs)
    return ((result[0], {}), result[1]) if mutable else (result, {})
  out, state = model.apply(variables, x, arch, capture_intermediates=capture_filter(model, names),
                           mutable=mutable + [INTERMEDIATES], **kwargs)
  features = collect(model, state.pop(INTERMEDIATES), names)
  return ((out, features), state) if mutable else (out, features)


def feature_names(model, variables: dict, sample, arch) -> list[str]:
  """Every module path whose output can be named (computes shapes only). Read from ``init``,
  which runs every block unconditionally, so blocks behind a ``cond`` / ``switch`` are listed
  too (:func:`feature_shapes` says which of them can be distilled)."""
  del variables  # init makes its own; the names depend on the module alone
  tree = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, arch,
                                             capture_intermediates=True)[INTERMEDIATES], sample)
  for part in _prefix(model):
    tree = tree.get(part, {})
  names = []

  def walk(node, path):
    for key, child in node.items():
      if key == "__call__":
        if path and getattr(child[0], "ndim", 0) >= 2:
          names.append("/".join(path))
      elif isinstance(child, dict):
        walk(child, path + (key,))
  walk(tree, ())
  return sorted(names)


def _skippable_block(model, name: str) -> str | None:
  """The skippable block (elastic depth) of an elasticized model that holds ``name``."""
  if not isinstance(model, ElasticNet):
    return None
  parts = tuple(name.split("/"))
  for block in model.plan().blocks:
    if parts[:len(block)] == tuple(block):
      return "/".join(block)
  return None


def _shapes(model, variables, sample, arch, names) -> dict:
  def run(v, x):
    return apply_with_features(model, v, x, arch, names, train=False)[1]
  return {n: s.shape for n, s in jax.eval_shape(run, variables, sample).items()}


def _refusal(model, name: str, error: Exception) -> str:
  """Why ``name`` cannot be captured, from the error tracing it alone gave."""
  text = str(error)
  if "cond branch" in text:
    return (f"feature layer {name!r} runs inside a block that some subnets skip (elastic "
            "depth), so they have no such feature; distil a layer every subnet runs, e.g. the "
            "output of a block that always runs (the first of a stage) or a layer outside the "
            "stages")
  if "switch branch" in text:
    return (f"feature layer {name!r} is inside an elastic block that active-size execution "
            f"(config.execution={model.execution!r}) computes at the subnet's width, so its "
            "shape changes from subnet to subnet and one adapter cannot read it; distil the "
            "block's output (the block's own path) or a layer outside elastic blocks, or set "
            "config.execution='masked' (every layer at full width)")
  return (f"feature layer {name!r} cannot be captured from this supernet "
          f"({type(error).__name__}: {text.splitlines()[0] if text else ''})")


def feature_shapes(model, variables: dict, sample, arch, names: Sequence[str]) -> dict:
  """{name: output shape} of the named layers, refusing with a ValueError: an unknown name
  (listing the valid ones), a layer in a skippable block, a layer whose shape changes with the
  subnet under active-size execution."""
  valid = feature_names(model, variables, sample, arch)
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ValueError(f"feature layers {unknown} are not module paths of the model; valid names: "
                     f"{valid}")
  for name in names:
    block = _skippable_block(model, name)
    if block is not None:
      raise ValueError(f"feature layer {name!r} is in the skippable block {block!r} (elastic "
                       "depth): subnets that skip it have no such feature; distil a layer "
                       "outside skippable blocks")
  try:
    return _shapes(model, variables, sample, arch, names)
  except TypeError:   # traced together first (one trace); alone only to name the culprit
    for name in names:
      try:
        _shapes(model, variables, sample, arch, (name,))
      except TypeError as e:
        raise ValueError(_refusal(model, name, e)) from None
    raise



def check_pairing(student_shapes: dict, teacher_shapes: dict) -> None:
  """A 1x1 adapter maps channels only: every other axis must agree."""
  for name, shape in student_shapes.items():
    other = teacher_shapes[name]
    if tuple(shape[:-1]) != tuple(other[:-1]):
      raise ValueError(f"feature layer {name!r} is {tuple(shape)} in the student but "
                       f"{tuple(other)} in the teacher: a 1x1 adapter maps channels only, so "
                       "every other axis must agree; pick a layer at the same resolution in both")


def init_adapters(key, student_shapes: dict, teacher_shapes: dict) -> dict:
  """{name: {"kernel": [C_student, C_teacher], "bias"}}: 1x1 convs, He-initialised."""
  check_pairing(student_shapes, teacher_shapes)
  adapters = {}
  for name, key in zip(sorted(student_shapes), jax.random.split(key, len(student_shapes))):
    c_in, c_out = student_shapes[name][-1], teacher_shapes[name][-1]
    kernel = jax.random.normal(key, (c_in, c_out)) * jnp.sqrt(2.0 / c_in)
    adapters[name] = {"kernel": kernel, "bias": jnp.zeros((c_out,))}
  return adapters


def feature_loss(adapters: dict, student: dict, teacher: dict) -> jax.Array:
  """Sum over layers of the MSE between the adapted student feature and the teacher's."""
  total = jnp.float32(0.0)
  for name, feature in student.items():
    adapted = feature @ adapters[name]["kernel"] + adapters[name]["bias"]
    total = total + jnp.mean((adapted - jax.lax.stop_gradient(teacher[name])) ** 2)
  return total
