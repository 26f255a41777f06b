"""int8 against float32 artifact bytes for subnets of full-size supernets.

``bench/bench_int8.py`` measures the default workdir's searched subnets: 0.1-0.3M parameters,
where the program (ops, types, shapes) is a sizeable part of each file. Here the same two
exporters (``export.save_stablehlo`` and ``quantize.save_stablehlo``, BN folded, static
activation ranges) write the largest and smallest subnet of full-size supernets at their usual
resolution. The weights are the supernet's random initialisation and the activation ranges come
from one batch of random images: an artifact's bytes depend on the shapes, not on the values.
Each file is broken down as ``bench/artifact_bytes.py`` does.

    PYTHONPATH=. python bench/bench_int8_size.py
    PYTHONPATH=. python bench/bench_int8_size.py --models ofa_mbv3:224
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from ofajax import export, models, quantize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from artifact_bytes import breakdown  # noqa: E402  (a sibling script, not a package)


def measure(name: str, resolution: int, tmp: str) -> list[dict]:
  """Bytes of the float32 and int8 artifacts of ``name``'s largest and smallest subnets."""
  model, space = models.get(name, num_classes=1000)
  channels = model.input_spec.channels
  variables = models.init(model, jax.random.key(0),
                          jnp.zeros((1, resolution, resolution, channels)))
  calib = jax.random.normal(jax.random.key(1), (1, 4, resolution, resolution, channels))
  rows = []
  for which in ("largest", "smallest"):
    arch = space.to_host(getattr(space, which)())
    dense, dense_variables = export.extract_subnet(model, variables, arch, space)
    files = {k: os.path.join(tmp, f"{name}-{which}.{k}.stablehlo") for k in ("float32", "int8")}
    t0 = time.perf_counter()
    export.save_stablehlo(dense, dense_variables, files["float32"], resolution)
    quantize.save_stablehlo(quantize.quantize(dense, dense_variables, calib), files["int8"],
                            resolution)
    row = {"model": name, "subnet": which, "name": space.name(arch), "resolution": resolution,
           "seconds": round(time.perf_counter() - t0, 1)}
    for k, path in files.items():
      row[f"{k}_breakdown"] = breakdown(path)
      row[f"{k}_bytes"] = row[f"{k}_breakdown"]["file"]
    row["size_ratio"] = row["int8_bytes"] / row["float32_bytes"]
    # the program's share: what the file would be with its constants' payload alone
    row["int8_program_share"] = row["int8_breakdown"]["program"] / row["int8_bytes"]
    rows.append(row)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="+", default=["ofa_mbv3:224", "compofa_mbv3:224"],
                 help="model:resolution")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "int8_size.json"))
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="bench-int8-size-")
  rows = []
  for spec in args.models:
    name, resolution = spec.split(":")
    rows += measure(name, int(resolution), tmp)
  print(f"{'model':<16} {'subnet':<9} {'float MB':>9} {'int8 MB':>8} {'ratio':>6} "
        f"{'int8 program':>13}")
  for r in rows:
    print(f"{r['model']:<16} {r['subnet']:<9} {r['float32_bytes'] / 1e6:>9.2f} "
          f"{r['int8_bytes'] / 1e6:>8.2f} {r['size_ratio']:>5.3f}x "
          f"{100 * r['int8_program_share']:>12.1f}%")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
  print(f"results in {args.out}")


if __name__ == "__main__":
  main()
