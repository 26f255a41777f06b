"""Convolutions with PyTorch's / OFA's symmetric padding, and their multiply-add counts.

The depthwise convolution has two implementations: shifted multiply-adds with a hand-written VJP
(fast on CPU) and XLA's grouped convolution (cuDNN's depthwise path on GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def conv_output_size(size: int, kernel: int, stride: int) -> int:
  """Spatial size after a conv with OFA's symmetric 'same' padding of ``kernel // 2``."""
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


# --------------------------------------------------------------------------- convolutions


def conv2d(x, kernel, stride: int = 1):
  """Regular conv, NHWC/HWIO, symmetric padding k//2 as PyTorch/OFA pad (so imported weights
  see the same pixels)."""
  k = kernel.shape[0]
  if k == 1:
    # A 1x1 conv is a matmul over the positions. As a 2-D dot its forward + backward runs
    # 2.2-3.0x faster on XLA:CPU than the einsum "nhwi,io->nhwo", whose weight gradient
    # contracts three axes (measured on OFA-MobileNetV3's expand shapes, batch 32 at 128 px;
    # bench/profile_train_step.py found the einsum's gradient among the costliest kernels).
    x = x[:, ::stride, ::stride] if stride > 1 else x
    n, h, w, c = x.shape
    return jnp.dot(x.reshape(n * h * w, c), kernel[0, 0]).reshape(n, h, w, kernel.shape[-1])
  p = k // 2
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def crop_kernel(kernel, size: int):
  """The centred ``size`` x ``size`` taps of a [k, k, ...] kernel (OFA's elastic kernel)."""
  start = (kernel.shape[0] - size) // 2
  return kernel[start:start + size, start:start + size]


def depthwise_conv2d(x, kernel, stride: int = 1, impl: str = "shift"):
  """Depthwise conv with kernel [k, k, 1, C] and symmetric padding k//2.

  ``impl="shift"`` sums k*k shifted multiply-adds (measured 12x faster forward than XLA's
  grouped convolution on CPU); ``impl="xla"`` uses ``lax.conv_general_dilated`` with
  ``feature_group_count=C`` (cuDNN's depthwise path on GPU).
  """
  k = kernel.shape[0]
  p = k // 2
  if impl == "xla":
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[-1])
  if impl != "shift":
    raise ValueError(f"depthwise impl must be 'shift' or 'xla', got {impl!r}")
  return _shift_depthwise(x, kernel, stride)


def _shift_taps(xp, kernel, stride: int, ho: int, wo: int):
  """sum_ij xp[:, i::stride, j::stride, :] * kernel[i, j, 0], on a pre-padded input."""
  k = kernel.shape[0]
  out = None
  for i in range(k):
    for j in range(k):
      tap = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


# A hand-written VJP: autodiff of the 49 shifted slices gives 49 pad ops into which XLA:CPU
# copies the whole upstream chain (conv, BN, activation), recomputing it per tap; the masked
# supernet's forward+backward then ran ~3x slower than the dense net's. Here the input gradient
# is one shift correlation of the dilated output gradient with the flipped kernel.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift_depthwise(x, kernel, stride: int):
  k, p = kernel.shape[0], kernel.shape[0] // 2
  ho, wo = conv_output_size(x.shape[1], k, stride), conv_output_size(x.shape[2], k, stride)
  return _shift_taps(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))), kernel, stride, ho, wo)


def _shift_depthwise_fwd(x, kernel, stride):
  return _shift_depthwise(x, kernel, stride), (x, kernel)


def _shift_depthwise_bwd(stride, residuals, g):
  x, kernel = residuals
  k, p = kernel.shape[0], kernel.shape[0] // 2
  h, w = x.shape[1], x.shape[2]
  ho, wo = g.shape[1], g.shape[2]
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  # dx[v] = sum_t dilated(g)[v + p - t] * kernel[t]: pad the dilated gradient by k-1-p = p on
  # the low side and enough on the high side to give back h x w, then correlate with the flip.
  g_dilated = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), (p, h - span_h + p, stride - 1),
                                                  (p, w - span_w + p, stride - 1), (0, 0, 0)])
  dx = _shift_taps(g_dilated, kernel[::-1, ::-1], 1, h, w)
  # dk[i, j] = sum over (n, h, w) of tap (i, j) times g: one variadic reduce over all k*k taps
  # reads x and g once (measured 2.4x faster than k*k separate sums, which read them k*k times,
  # for a 7x7 kernel on [32, 64, 64, 96] on 2 CPU cores; bench/bench_train_step.py).
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  products = tuple(xp[:, i:i + span_h:stride, j:j + span_w:stride, :] * g
                   for i in range(k) for j in range(k))
  zeros = tuple(jnp.zeros((), g.dtype) for _ in products)
  dk = lax.reduce(products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1, 2))
  return dx, jnp.stack(dk).reshape(kernel.shape)


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


def depthwise_conv2d_choice(x, kernel, index, sizes, stride: int = 1, impl: str = "shift"):
  """``depthwise_conv2d(x, kernel)`` for a kernel that is zero outside its centred
  ``sizes[index]`` square (a smaller elastic kernel, zero-padded to the largest size), computed
  at that size only: ``index`` is traced, so one compiled function serves every size.

  The forward and the backward each run one branch of a ``lax.switch``. Autodiff of a plain
  switch would keep every branch's residuals (zero-filled for the branches not taken); here the
  residuals are the inputs, and the kernel gradient is zero outside the chosen square, exactly
  as the zero-padded conv's gradient would be after the zero padding.
  """
  return _depthwise_choice(x, kernel, index, tuple(sizes), stride, impl)


def _conv_at(size: int, stride: int, impl: str):
  return lambda x, kernel: depthwise_conv2d(x, crop_kernel(kernel, size), stride, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _depthwise_choice(x, kernel, index, sizes, stride, impl):
  return lax.switch(index, [_conv_at(s, stride, impl) for s in sizes], x, kernel)


def _depthwise_choice_fwd(x, kernel, index, sizes, stride, impl):
  return _depthwise_choice(x, kernel, index, sizes, stride, impl), (x, kernel, index)


def _depthwise_choice_bwd(sizes, stride, impl, residuals, g):
  x, kernel, index = residuals

  def pullback(size):
    def run(x, kernel, g):
      _, vjp = jax.vjp(_conv_at(size, stride, impl), x, kernel)
      return vjp(g)   # the crop's transpose pads the kernel gradient back with zeros
    return run

  dx, dk = lax.switch(index, [pullback(s) for s in sizes], x, kernel, g)
  return dx, dk, None


_depthwise_choice.defvjp(_depthwise_choice_fwd, _depthwise_choice_bwd)


def spatial_taps(size: int, kernel, stride: int, exclude_padding: bool = False):
  """Multiply-adds per channel pair of a k x k conv on a size x size input: output positions x
  taps. OFA counts every tap; XLA's cost analysis skips taps that land on the zero padding
  (``exclude_padding=True``, static ints only)."""
  out = (size - 1) // stride + 1  # conv_output_size for any odd kernel with pad k // 2
  if not exclude_padding:
    return out * out * kernel * kernel
  pad = kernel // 2
  per_axis = sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride - pad + t < size)
  return per_axis * per_axis
