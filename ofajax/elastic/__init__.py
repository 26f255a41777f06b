"""Bring your own Flax model: ``ofajax.elasticize`` turns an ordinary ``flax.linen`` module into
a supernet that trains, searches and exports like the built-in ones.

    supernet, space, variables = ofajax.elasticize(MyResNet(), jnp.ones((1, 32, 32, 3)),
                                                   variables=pretrained, skippable=("block2",))
    print(ofajax.elastic.describe(supernet))   # the channel groups it found

See ``docs/elasticize.md``.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ofajax.elastic.dense import DenseTwin
from ofajax.elastic.plan import NET, TRANSFORMS, ElasticizeError, input_spec_of, path_text
from ofajax.elastic.supernet import ElasticNet
from ofajax.elastic.tracing import as_struct
from ofajax.models import FAST_COMPILE

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
               kernels: bool = True, kernel_transforms: bool = False,
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
    kernels: elastic kernel sizes (centre crops) for convs with odd square kernels above 3x3.
    kernel_transforms: OFA's learned kernel transform matrices between those sizes.
    train_arg: the name of the module's train flag ("!name" when it means "not training");
      found from the signature by default.
  """
  spec = as_struct(sample_input)
  supernet, space = _build(module, spec, widths, divisor, skippable, frozen, kernels,
                           kernel_transforms, train_arg)
  init = functools.partial(supernet.init, arch=space.largest())
  if variables is not None:   # only the structure of a fresh init is needed: its shapes
    return supernet, space, wrap_variables(variables, jax.eval_shape(init, jax.random.key(0),
                                                                      spec))
  # One-off: compile for speed of compilation (as ofajax.models.init does).
  fresh = jax.jit(init).lower(jax.random.key(seed), spec).compile(
      compiler_options=FAST_COMPILE)(jax.random.key(seed), jnp.zeros(spec.shape, spec.dtype))
  return supernet, space, {"params": fresh["params"], "batch_stats": fresh.get("batch_stats", {})}


def _build(module, spec, widths, divisor, skippable, frozen, kernels, kernel_transforms,
           train_arg):
  """(supernet, space), checked: the input kind, then the trace, then the smallest subnet."""
  input_spec_of(tuple(spec.shape), str(spec.dtype))   # a clear error before tracing
  supernet = ElasticNet(module, tuple(spec.shape), str(spec.dtype),
                        train_arg_of(module) if train_arg is None else train_arg,
                        tuple(float(w) for w in widths), int(divisor),
                        skippable if callable(skippable) else tuple(skippable), tuple(frozen),
                        bool(kernels), bool(kernel_transforms))
  space = supernet.search_space()
  check_structure(supernet, space)
  return supernet, space


def check_structure(supernet: ElasticNet, space) -> None:
  """The smallest subnet calls the same layers as the full model (shapes only, nothing runs);
  an ElasticizeError names the layer of a model that decides its structure from channel
  counts."""
  x = jax.ShapeDtypeStruct(supernet.sample_shape, jnp.dtype(supernet.sample_dtype))
  dense = supernet.dense_model(space.to_host(space.smallest()))
  jax.eval_shape(lambda x: dense.init(jax.random.key(0), x), x)


def wrap_variables(user_variables, fresh: dict) -> dict:
  """The user's variables under the supernet's ``"net"`` key (with identity kernel transforms
  if the supernet has them), checked against a fresh init (or its shapes)."""
  wrapped = {"params": {NET: dict(user_variables["params"])},
             "batch_stats": ({NET: dict(user_variables["batch_stats"])}
                             if "batch_stats" in user_variables else {})}
  fresh = {"params": fresh["params"], "batch_stats": fresh.get("batch_stats", {})}
  if TRANSFORMS in fresh["params"]:   # OFA's kernel transforms start as the identity
    wrapped["params"][TRANSFORMS] = jax.tree.map(
        lambda s: jnp.eye(s.shape[0], dtype=jnp.float32), fresh["params"][TRANSFORMS])
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
  for j, (i, sizes) in enumerate(zip(supernet.kernel_layers(), supernet.kernel_values())):
    lines.append(f"kernel[{j}]: {path_text(plan.layers[i].path)} (sizes {sizes})")
  for b, path in enumerate(plan.blocks):
    lines.append(f"block keep[{b}]: {path_text(path)}")
  return "\n".join(lines)




# --------------------------------------------------------------------------- from a config


def load_factory(factory: str):
  """The function ``"pkg.module:function"`` names (a clear error if it does not exist)."""
  module_name, _, attr = str(factory).partition(":")
  if not module_name or not attr:
    raise ElasticizeError(f"factory must look like 'my_pkg.nets:resnet18', got {factory!r}")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ElasticizeError(f"factory {factory!r}: cannot import {module_name!r} ({e}); is its "
                          "package on PYTHONPATH?") from e
  fn = vars(module).get(attr)
  if not callable(fn):
    raise ElasticizeError(f"factory {factory!r}: {module_name} has no function {attr!r}")
  return fn


def call_factory(factory: str, factory_options=None):
  """``(module, sample_input, variables or None)`` from a factory returning ``(module,
  sample_input)`` or ``(module, sample_input, variables)``."""
  made = load_factory(factory)(**dict(factory_options or {}))
  if not isinstance(made, tuple) or len(made) not in (2, 3) or not isinstance(made[0], nn.Module):
    raise ElasticizeError(f"factory {factory!r} must return (flax module, sample_input) or "
                          "(flax module, sample_input, variables)")
  return made[0], made[1], (made[2] if len(made) == 3 else None)


def from_factory(factory: str, factory_options=None, widths=(0.25, 0.5, 0.75, 1.0),
                 divisor: int = 1, skippable=(), frozen=(), kernels=True,
                 kernel_transforms=False, train_arg=None):
  """``(supernet, space)`` for ``config.model = "elasticize"``: the factory's module made
  elastic (its pretrained variables, if any, come from :func:`factory_variables`)."""
  module, sample, _ = call_factory(factory, factory_options)
  return _build(module, as_struct(sample), widths, divisor, skippable, frozen, kernels,
                kernel_transforms, train_arg)


def from_config_options(options: dict):
  """``from_factory`` from ``config.model_options``, naming what is missing or unknown."""
  known = set(inspect.signature(from_factory).parameters)
  unknown = sorted(set(options) - known)
  if unknown or "factory" not in options:
    raise ElasticizeError(
        "config.model='elasticize' needs config.model_options.factory ('pkg.module:function' "
        f"returning (module, sample_input[, variables])); unknown options {unknown}; options "
        f"are {sorted(known)}")
  return from_factory(**options)


def factory_variables(supernet: ElasticNet, options: dict, fresh: dict):
  """The factory's pretrained variables in the supernet's layout, or None if it gives none."""
  _, _, variables = call_factory(options["factory"], options.get("factory_options"))
  return None if variables is None else wrap_variables(variables, fresh)


__all__ = ["DenseTwin", "ElasticNet", "ElasticizeError", "call_factory", "check_structure", "describe", "elasticize",
           "factory_variables", "from_config_options", "from_factory", "load_factory", "train_arg_of", "wrap_variables"]
