"""Demo of the core (until train.py lands): build a supernet, cut subnets, prove the export.

Runs offline on real data shipped in a package (scikit-learn's handwritten digits): builds the
tiny OFA MobileNetV3 supernet, samples subnets, prints their MACs / params, checks that each
exported dense subnet computes exactly what the masked supernet computes on the digits, and
round-trips one subnet through a StableHLO file served by plain JAX.
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import ofajax
from ofajax import cost, export

FAST = ofajax.models.FAST_COMPILE


def digits_batch(n: int = 64, size: int = 28) -> jax.Array:
  """The first n digits (8x8, values 0..16) scaled to [0, 1] and upsampled to size x size."""
  images = load_digits().images[:n].astype(np.float32) / 16.0
  x = jnp.asarray(images)[..., None]
  return jax.image.resize(x, (n, size, size, 1), "bilinear")


def main(num_random: int = 6, seed: int = 0):
  start = time.time()
  model, space = ofajax.models.get("ofa_mbv3_tiny")
  print(f"supernet ofa_mbv3_tiny: {space.cardinality():.4g} subnets "
        f"(exactly {space.cardinality()}); CompOFA space: "
        f"{ofajax.models.get('compofa_mbv3_tiny')[1].cardinality()}")
  x = digits_batch()
  variables = ofajax.models.init(model, jax.random.key(seed), x)
  forward = jax.jit(lambda v, x, a: model.apply(v, x, a, train=False))

  archs = [("largest", space.largest()), ("smallest", space.smallest())]
  keys = jax.random.split(jax.random.key(seed + 1), num_random)
  archs += [(space.name(a), a) for a in (space.sample(k) for k in keys)]

  print(f"\n{'subnet':<60} {'MACs':>10} {'params':>9} {'export rel. err':>16}")
  worst = 0.0
  for name, arch in archs:
    c = cost.count(model, arch, 28)
    dense_model, dense_vars = export.extract_subnet(model, variables, arch, space)
    masked = forward(variables, x, arch)
    dense = jax.jit(dense_model.apply, compiler_options=FAST)(dense_vars, x)
    err = float(jnp.max(jnp.abs(dense - masked)) / jnp.max(jnp.abs(masked)))
    worst = max(worst, err)
    print(f"{name:<60} {c['macs']:>10,} {c['params']:>9,} {err:>16.2e}")

  dense_model, dense_vars = export.extract_subnet(model, variables, space.smallest(), space)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "smallest.stablehlo")
    export.save_stablehlo(dense_model, dense_vars, path, resolution=28, in_channels=1)
    served = export.load_stablehlo(path)(x[:5])
    size = os.path.getsize(path)
  expected = forward(variables, x[:5], space.smallest())
  served_err = float(jnp.max(jnp.abs(served - expected)) / jnp.max(jnp.abs(expected)))
  worst = max(worst, served_err)
  print(f"\nStableHLO round trip of the smallest subnet ({size:,} bytes): relative error "
        f"{served_err:.2e}")
  print(f"worst export relative error {worst:.2e} (must be <= 1e-5); {time.time() - start:.0f} s")
  if worst > 1e-5:
    raise SystemExit("export check FAILED")


if __name__ == "__main__":
  main()
