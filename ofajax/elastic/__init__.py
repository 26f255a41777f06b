"""Bring your own Flax model: ``ofajax.elasticize`` turns an ordinary ``flax.linen`` module into
a supernet that trains, searches and exports like the built-in ones.

    supernet, space, variables = ofajax.elasticize(MyResNet(), jnp.ones((1, 32, 32, 3)),
                                                   variables=pretrained, skippable=("block2",))
    print(ofajax.elastic.describe(supernet))   # the channel groups it found

See ``docs/elasticize.md``.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofajax.elastic.supernet import NET, DenseTwin, ElasticNet
from ofajax.elastic.tracing import ElasticizeError, as_struct, path_text

# Names a user's __call__ may give its train flag ("!" = the flag means "not training").
TRAIN_ARGS = {"train": "train", "training": "training", "is_training": "is_training",
              "deterministic": "!deterministic", "use_running_average": "!use_running_average"}


def train_arg_of(module: nn.Module) -> str:
  """How ``module.__call__`` is told it is training ("" when it takes no such flag)."""
  params = inspect.signature(type(module).__call__).parameters
  for name, arg in TRAIN_ARGS.items():
    if name in params:
      return arg
  return ""


def elasticize(module: nn.Module, sample_input, variables=None, *,
               widths=(0.25, 0.5, 0.75, 1.0), divisor: int = 1, skippable=(), frozen=(),
               train_arg: str | None = None, seed: int = 0):
  """``(supernet, space, variables)`` for a user's ``flax.linen`` module.

  Args:
    module: the user's model; ``module.apply(v, x, train=...)`` returns logits.
    sample_input: an input batch (or its shape and dtype): NHWC images or int token ids.
    variables: the model's trained variables (``module.init``'s structure), carried over
      unchanged so the largest subnet is the original model; None initialises fresh ones.
    widths: width choices of every elastic channel group, as fractions of its full width.
    divisor: widths are rounded to multiples of it (8 suits accelerators).
    skippable: module paths ("layer2/block1") or a predicate ``fn(path, module)`` naming
      blocks that depth may skip; their output must have their input's shape.
    frozen: layer paths whose output width stays fixed (e.g. a layer feeding an operation
      ofajax cannot follow).
    train_arg: the name of the module's train flag ("!name" when it means "not training");
      found from the signature by default.
  """
  spec = as_struct(sample_input)
  supernet = ElasticNet(module, tuple(spec.shape), str(spec.dtype),
                        train_arg_of(module) if train_arg is None else train_arg,
                        tuple(float(w) for w in widths), int(divisor),
                        skippable if callable(skippable) else tuple(skippable),
                        tuple(frozen))
  space = supernet.search_space()
  x = jnp.zeros(spec.shape, spec.dtype)
  fresh = jax.jit(supernet.init)(jax.random.key(seed), x, space.largest())
  fresh = {"params": fresh["params"], "batch_stats": fresh.get("batch_stats", {})}
  if variables is None:
    return supernet, space, fresh
  return supernet, space, wrap_variables(variables, fresh)


def wrap_variables(user_variables, fresh: dict) -> dict:
  """The user's variables under the supernet's ``"net"`` key, checked against a fresh init."""
  wrapped = {"params": {NET: dict(user_variables["params"])},
             "batch_stats": ({NET: dict(user_variables["batch_stats"])}
                             if "batch_stats" in user_variables else {})}
  want = jax.tree_util.tree_flatten_with_path(fresh)[0]
  have = dict(jax.tree_util.tree_flatten_with_path(wrapped)[0])
  for key, leaf in want:
    got = have.get(key)
    if got is None or np.shape(got) != np.shape(leaf):
      raise ElasticizeError(f"variables{jax.tree_util.keystr(key)} is "
                            f"{'missing' if got is None else f'shaped {np.shape(got)}'}; the "
                            f"model makes it {np.shape(leaf)}: pass the variables of this "
                            "module (module.init's structure)")
  return wrapped


def describe(supernet: ElasticNet) -> str:
  """The channel groups, one per line: width, whether elastic, the layers producing it."""
  plan = supernet.plan()
  elastic = supernet.elastic_groups()
  lines = [f"{'group':>5}  {'channels':>8}  {'elastic':<28}  layers"]
  for i, group in enumerate(plan.groups):
    where = (f"width[{elastic.index(i)}]" if i in elastic else f"fixed: {group.fixed_by}")
    lines.append(f"{i:>5}  {group.size:>8}  {where:<28}  {', '.join(group.producers)}")
  for b, path in enumerate(plan.blocks):
    lines.append(f"block keep[{b}]: {path_text(path)}")
  return "\n".join(lines)


__all__ = ["DenseTwin", "ElasticNet", "ElasticizeError", "describe", "elasticize",
           "train_arg_of", "wrap_variables"]
