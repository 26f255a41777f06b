"""StableHLO serialisation of exported subnets: served by plain JAX, any batch size."""

import jax
import pytest

import ofajax
from ofajax import export
from conftest import rel_err


def test_stablehlo_round_trip_any_batch(tmp_path, perturb):
  model, space = ofajax.models.get("slim_mobilenet_v2_tiny")
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  variables = perturb(ofajax.models.init(model, jax.random.key(1), x), jax.random.key(2))
  arch = space.sample(jax.random.key(3))
  dense_model, dense_vars = export.extract_subnet(model, variables, arch, space)
  path = str(tmp_path / "subnet.stablehlo")
  export.save_stablehlo(dense_model, dense_vars, path, resolution=28, in_channels=1)
  served = export.load_stablehlo(path)
  expected = model.apply(variables, x, arch, train=False)
  assert rel_err(served(x), expected) <= 1e-5
  assert served(x[:1]).shape == (1, model.num_classes)  # symbolic batch dimension


def test_load_stablehlo_rejects_corrupt_file(tmp_path):
  path = tmp_path / "broken.stablehlo"
  path.write_bytes(b"not a flatbuffer at all")
  with pytest.raises(ValueError, match="is not a StableHLO artifact"):
    export.load_stablehlo(str(path))
