"""calibrate_bn: exact averages of batch moments, per arch, batched over archs."""

import jax
import jax.numpy as jnp
import numpy as np

import ofajax
from ofajax.bn import calibrate_bn


def test_calibration_is_the_average_of_batch_moments_per_arch():
  model, space = ofajax.models.get("slim_mobilenet_v2_tiny")
  images = jax.random.normal(jax.random.key(0), (3, 4, 28, 28, 1))
  variables = ofajax.models.init(model, jax.random.key(1), images[0])
  archs = [space.largest(), space.smallest(), space.sample(jax.random.key(2))]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *archs)
  stats = calibrate_bn(model, variables, stacked, images, archs_per_call=2)
  for k, arch in enumerate(archs):
    # Reference: the stem BN's input is the stem conv's output; average its batch moments.
    width = int(arch["width"][0])
    kernel = variables["params"]["stem"]["kernel"]
    convs = [ofajax.layers.conv2d(images[b], kernel, 2)[..., :width] for b in range(3)]
    want_mean = np.mean([np.mean(c, axis=(0, 1, 2)) for c in convs], axis=0)
    want_var = np.mean([np.var(c, axis=(0, 1, 2)) for c in convs], axis=0)
    got = stats["stem"]["bn"]
    np.testing.assert_allclose(got["mean"][k][:width], want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"][k][:width], want_var, rtol=1e-4, atol=1e-5)
    # inactive channels keep the statistics they had
    np.testing.assert_array_equal(got["var"][k][width:], variables["batch_stats"]["stem"]["bn"]["var"][width:])
  # different archs get different statistics deeper in the net
  head = np.asarray(stats["head"]["bn"]["mean"])
  assert not np.allclose(head[0], head[1])
