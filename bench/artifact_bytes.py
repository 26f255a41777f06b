"""Where the bytes of a StableHLO artifact (``export.save_stablehlo``) go.

    PYTHONPATH=. python bench/artifact_bytes.py model.stablehlo model_int8.stablehlo

Per file: its size; the serialized module in it (the rest is jax.export's calling convention:
shapes, tree structure, platforms); of the module, the constants' payload per element type
(the weights, BN and scales baked in), the source locations (what ``export.compact``
removes first: the module's size with and without them), and the program (ops, types, attributes:
the remainder); the op count and the most frequent ops.
"""

from __future__ import annotations

import argparse
import collections
import json

import jax
import numpy as np
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo

from ofajax import export



def breakdown(path: str) -> dict:
  with open(path, "rb") as f:
    data = f.read()
  exported = jax.export.deserialize(bytearray(data))
  module_bytes = len(exported.mlir_module_serialized)
  located = module_bytes - len(export.run_passes(exported, "strip-debuginfo").mlir_module_serialized)
  constants, ops = collections.Counter(), collections.Counter()
  with ir.Context() as context:
    stablehlo.register_dialect(context)
    module = stablehlo.deserialize_portable_artifact(context, exported.mlir_module_serialized)
    for op in _walk(module.operation):
      ops[op.name] += 1
      if op.name == "stablehlo.constant":
        value = ir.DenseElementsAttr(op.attributes["value"])
        kind = ir.RankedTensorType(op.result.type)
        # a splat (one value repeated) is stored once
        count = 1 if value.is_splat else int(np.prod(kind.shape))
        constants[str(kind.element_type)] += count * _bits(kind.element_type) // 8
  payload = sum(constants.values())
  return {"file": len(data), "module": module_bytes, "constants": dict(constants),
          "locations": located, "program": module_bytes - payload - located,
          "ops": sum(ops.values()), "top_ops": dict(ops.most_common(8))}


def _walk(op):
  yield op
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        yield from _walk(child.operation)


def _bits(element_type) -> int:
  for kind in (ir.IntegerType, ir.FloatType):
    try:
      return kind(element_type).width
    except ValueError:  # not of this kind
      continue
  raise ValueError(f"no width for constants of type {element_type}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("paths", nargs="+")
  for path in p.parse_args().paths:
    print(json.dumps({"path": path, **breakdown(path)}))


if __name__ == "__main__":
  main()
