"""Intermediate-feature distillation through learned 1x1 adapters (GAN Compression).

The student's output at each named layer is mapped by a learned 1x1 conv (an *adapter*) to the
teacher's width at the same layer, and pulled towards the teacher's output by a mean squared
error. Adapters exist because the student's layers are narrower than the teacher's (after
pruning, or in a subnet). A subnet's inactive channels are zero in its features (masked
execution zeroes them), so one adapter over the student's full width serves every subnet.

Layers are named by their module path in the user's model ("block2", "up1"), the paths that
``feature_names`` lists; a name that is not one raises an error listing them. Any supernet whose
forward is a flax module works: the ``ofajax.elasticize`` ones (the user's model under "net"),
and the built-in ones.
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


def feature_names(model, variables: dict, sample, arch) -> list[str]:
  """Every module path whose output can be distilled (computes shapes only)."""
  def run(v, x):
    _, state = model.apply(v, x, arch, train=False, capture_intermediates=True,
                           mutable=[INTERMEDIATES])
    return state[INTERMEDIATES]
  tree = jax.eval_shape(run, variables, sample)
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


def feature_shapes(model, variables: dict, sample, arch, names: Sequence[str]) -> dict:
  """{name: output shape} of the named layers; an unknown name raises a ValueError that lists
  the valid ones."""
  valid = feature_names(model, variables, sample, arch)
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ValueError(f"feature layers {unknown} are not module paths of the model; valid names: "
                     f"{valid}")

  def run(v, x):
    _, state = model.apply(v, x, arch, train=False, capture_intermediates=capture_filter(
        model, names), mutable=[INTERMEDIATES])
    return collect(model, state[INTERMEDIATES], names)
  return {n: s.shape for n, s in jax.eval_shape(run, variables, sample).items()}


def init_adapters(key, student_shapes: dict, teacher_shapes: dict) -> dict:
  """{name: {"kernel": [C_student, C_teacher], "bias"}}: 1x1 convs, He-initialised."""
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
