"""Elastic layers against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofajax import layers


@pytest.mark.parametrize("k,stride,size", [(3, 1, 9), (5, 2, 9), (7, 2, 8), (7, 1, 5)])
def test_depthwise_shift_equals_xla_grouped_conv(k, stride, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
  kernel = jax.random.normal(jax.random.key(1), (k, k, 1, 6))
  shift = layers.depthwise_conv2d(x, kernel, stride, "shift")
  xla = layers.depthwise_conv2d(x, kernel, stride, "xla")
  out = layers.conv_output_size(size, k, stride)
  assert shift.shape == xla.shape == (2, out, out, 6)
  np.testing.assert_allclose(shift, xla, rtol=1e-5, atol=1e-5)
  # the hand-written VJP of the shift form equals XLA's gradients
  g = jax.random.normal(jax.random.key(2), shift.shape)
  grads = [jax.vjp(lambda x, k: layers.depthwise_conv2d(x, k, stride, impl), x, kernel)[1](g)
           for impl in ("shift", "xla")]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _ofa_reference_kernel(weight_oihw, matrices, k):
  """OFA's get_active_filter re-derived in numpy on PyTorch's [C, 1, k, k] layout:
  crop the centre of the previous size, view as [C, k*k], multiply by M^T, chain 7->5->3."""
  current = weight_oihw
  size = weight_oihw.shape[-1]
  for target in (5, 3):
    if target < k:
      break
    start = (size - target) // 2
    crop = current[:, :, start:start + target, start:start + target]
    flat = crop.reshape(crop.shape[0] * crop.shape[1], target * target)
    current = (flat @ matrices[f"{size}to{target}"].T).reshape(crop.shape)
    size = target
  return current


@pytest.mark.parametrize("k", [3, 5, 7])
def test_kernel_transform_follows_ofa_convention(k):
  rng = np.random.default_rng(0)
  channels = 4
  module = layers.ElasticDepthwiseConv((3, 5, 7), 1, transform=True, impl="xla")
  x = jnp.asarray(rng.normal(size=(1, 9, 9, channels)), jnp.float32)
  variables = module.init(jax.random.key(0), x, 7)
  params = jax.tree.map(np.asarray, variables["params"])
  params["transform_7to5"] = rng.normal(size=(25, 25)).astype(np.float32)
  params["transform_5to3"] = rng.normal(size=(9, 9)).astype(np.float32)
  weight_oihw = np.transpose(params["kernel"], (3, 2, 0, 1))  # [k,k,1,C] -> [C,1,k,k]
  ref = _ofa_reference_kernel(weight_oihw, {"7to5": params["transform_7to5"],
                                            "5to3": params["transform_5to3"]}, k)
  ref_hwio = np.transpose(ref, (2, 3, 1, 0))
  sliced = layers.ElasticDepthwiseConv.slice_variables(params, channels, k, (3, 5, 7))
  np.testing.assert_allclose(sliced["kernel"], ref_hwio, rtol=1e-5, atol=1e-5)
  # and the elastic forward (zero-padded to 7x7) equals a plain k x k conv with that kernel
  y = module.apply({"params": params}, x, jnp.int32(k))
  y_ref = layers.depthwise_conv2d(x, jnp.asarray(ref_hwio), 1, "xla")
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_make_divisible_matches_reference_and_arrays():
  # reference values of the OFA / MobileNet rule
  cases = {(19.2, 8): 24, (16 * 0.35, 8): 8, (72, 8): 72, (36, 8): 40, (20, 8): 24, (1280 * 1.2, 8): 1536}
  for (v, d), want in cases.items():
    assert layers.make_divisible(v, d) == want
  ints = np.arange(1, 400)
  want = np.array([layers.make_divisible(int(v), 8) for v in ints])
  np.testing.assert_array_equal(layers.make_divisible(ints, 8), want)
  np.testing.assert_array_equal(jax.jit(layers.make_divisible)(jnp.asarray(ints)), want)


def test_batchnorm_keeps_inactive_channels_zero_and_their_statistics():
  bn = layers.ElasticBatchNorm()
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 8))
  mask = layers.channel_mask(jnp.int32(5), 8)
  x = x * mask
  variables = bn.init(jax.random.key(1), x, True)
  params = {"scale": jnp.full((8,), 2.0), "bias": jnp.full((8,), 0.5)}  # a bias would leak
  y, upd = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, True, mask,
                    mutable=["batch_stats"])
  assert np.all(np.asarray(y[..., 5:]) == 0.0) and np.any(np.asarray(y[..., :5]) != 0.0)
  np.testing.assert_array_equal(upd["batch_stats"]["var"][5:], 1.0)
  assert np.all(np.asarray(upd["batch_stats"]["var"][:5]) != 1.0)
  _, frozen = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, True, mask,
                       False, mutable=["batch_stats"])
  np.testing.assert_array_equal(frozen["batch_stats"]["mean"], 0.0)


def test_squeeze_excite_hidden_width_follows_active_channels():
  # OFA DynamicSE: hidden = make_divisible(active // 4, 8)
  assert [int(layers.se_channels(c)) for c in (72, 120, 144, 240)] == [24, 32, 40, 64]
  se = layers.ElasticSqueezeExcite()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 144)) * layers.channel_mask(72, 144)
  variables = se.init(jax.random.key(1), x, 72)
  p = jax.tree.map(lambda a: a + 0.3, variables["params"])  # non-zero biases would leak
  y = se.apply({"params": p}, x, jnp.int32(72))
  dense = layers.SqueezeExcite().apply(
      {"params": layers.ElasticSqueezeExcite.slice_variables(p, 72)}, x[..., :72])
  np.testing.assert_allclose(y[..., :72], dense, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(y[..., 72:]) == 0.0)
