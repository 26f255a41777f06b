"""Dense subnet extraction and StableHLO serialisation.

``extract_subnet`` is the proof that the supernet's masks mean what they claim: it slices the
supernet's parameters (kernel transforms baked in) into an ordinary Flax model with static
shapes whose eval-mode outputs equal the masked supernet's. ``save_stablehlo`` serialises such a
model with ``jax.export`` so it can be served by plain JAX, without ofajax.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.extend.mlir import ir, passmanager
from jax.extend.mlir.dialects import stablehlo

from ofajax.models.base import Supernet


def extract_subnet(model: Supernet, variables: dict, arch, space=None):
  """Returns ``(dense_model, dense_variables)`` for ``arch`` (validated on the host first)."""
  space = model.search_space() if space is None else space
  arch = space.validate(arch)
  return model.dense_model(arch), model.slice_variables(variables, arch)


def save_stablehlo(dense_model, dense_variables: dict, path: str, resolution: int,
                   in_channels: int | None = None) -> jax.export.Exported:
  """Serialises ``x -> logits`` (eval mode, weights baked in, any batch size) to ``path``.

  ``x`` is what ``dense_model.input_spec`` says: float32 [batch, resolution, resolution,
  channels] images, or for text models int32 [batch, resolution] token ids (``resolution`` is
  then the sequence length). ``in_channels``, where given, must agree with the model's.
  """
  def forward(x):
    return dense_model.apply(dense_variables, x, train=False)

  spec = dense_model.input_spec
  if in_channels is not None and spec.kind == "image" and int(in_channels) != spec.channels:
    raise ValueError(f"in_channels={in_channels}, but the model reads {spec.channels} channels")
  batch = jax.export.symbolic_shape("batch")[0]
  exported = compact(jax.export.export(jax.jit(forward))(spec.struct(resolution, batch)))
  with open(path, "wb") as f:
    f.write(exported.serialize())
  return exported


def compact(exported: jax.export.Exported) -> jax.export.Exported:
  """``exported`` without source locations, and with duplicate ops computed once: the same
  function, in fewer bytes.

  jax.export records, for every op, the Python traceback of the code that traced it (file,
  line, function; ``jax_include_full_tracebacks_in_locations`` is on by default) and its name
  stack. Nothing that loads or runs the artifact reads them. And the batch being symbolic, every
  broadcast, reshape and slice on a batched tensor computes its shape from the batch size in
  ops of its own, the same few ops over and over; MLIR's common-subexpression elimination
  keeps one of each. XLA would do the same when compiling: only the file changes.
  """
  return run_passes(exported, "strip-debuginfo,func.func(cse)")


def run_passes(exported: jax.export.Exported, pipeline: str) -> jax.export.Exported:
  """``exported`` with its module rewritten by the MLIR pass ``pipeline`` (textual, nested in
  ``builtin.module(...)``), re-serialized at the StableHLO version jax.export targets."""
  with ir.Context() as context:
    stablehlo.register_dialect(context)
    module = stablehlo.deserialize_portable_artifact(context, exported.mlir_module_serialized)
    passmanager.PassManager.parse(f"builtin.module({pipeline})").run(module.operation)
    version = stablehlo.get_version_from_compatibility_requirement(
        stablehlo.StablehloCompatibilityRequirement.WEEK_4)
    serialized = stablehlo.serialize_portable_artifact(module, version)
  return dataclasses.replace(exported, mlir_module_serialized=serialized)


def load_stablehlo(path: str):
  """Loads a file written by :func:`save_stablehlo`; call it as ``fn(x)``."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # corrupt or foreign file: say which and why
    raise ValueError(f"{path} is not a StableHLO artifact written by save_stablehlo: {e}") from e
  return exported.call
