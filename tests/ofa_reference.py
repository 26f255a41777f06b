"""An independent numpy re-implementation of once-for-all's PyTorch supernets, for tests.

Written from once-for-all's source (``ofa/imagenet_classification/elastic_nn``, ``ofa/utils``),
not from ofajax: state dicts with OFA's key names and torch layouts (NCHW, [out, in, kh, kw]),
OFA's arch encodings (``{"ks", "e", "d"}`` for MobileNetV3, ``{"d", "e", "w"}`` for ResNet50)
and OFA's forward semantics (prefix slicing of weights and BN statistics, 7->5->3 kernel
transforms as ``F.linear(flat, M)``, SE width ``make_divisible(mid // 4, 8)``, ceil-mode
average-pool shortcuts). Everything runs in float64.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def make_divisible(v, divisor=8):
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


# --------------------------------------------------------------------------- state dicts


def _bn(sd, prefix, c, rng):
  sd[prefix + "weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
  sd[prefix + "bias"] = rng.normal(0, 0.2, c).astype(np.float32)
  sd[prefix + "running_mean"] = rng.normal(0, 0.2, c).astype(np.float32)
  sd[prefix + "running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
  sd[prefix + "num_batches_tracked"] = np.array(1000, np.int64)


def _conv(sd, key, cout, cin, k, rng):
  sd[key] = (rng.normal(0, 1, (cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)


MBV3_BASE = [16, 16, 24, 40, 80, 112, 160, 960, 1280]
MBV3_STRIDES = [1, 2, 2, 2, 1, 2]
MBV3_ACTS = ["relu", "relu", "relu", "h_swish", "h_swish", "h_swish"]
MBV3_SE = [False, False, True, False, True, True]


def mbv3_widths(width_mult):
  return [make_divisible(w * width_mult) for w in MBV3_BASE]


def ofa_mbv3_state_dict(width_mult, rng, n_classes=1000):
  """Random tensors under the keys of ``OFAMobileNetV3(width_mult, ks_list=[3, 5, 7],
  expand_ratio_list=[3, 4, 6], depth_list=[2, 3, 4]).state_dict()``."""
  w = mbv3_widths(width_mult)
  sd = {}
  _conv(sd, "first_conv.conv.weight", w[0], 3, 3, rng)
  _bn(sd, "first_conv.bn.", w[0], rng)
  _conv(sd, "blocks.0.conv.depth_conv.conv.weight", w[0], 1, 3, rng)
  _bn(sd, "blocks.0.conv.depth_conv.bn.", w[0], rng)
  _conv(sd, "blocks.0.conv.point_linear.conv.weight", w[1], w[0], 1, rng)
  _bn(sd, "blocks.0.conv.point_linear.bn.", w[1], rng)
  n, cin = 1, w[1]
  for s in range(5):
    cout = w[s + 2]
    for _ in range(4):
      mid = make_divisible(round(cin * 6))
      p = f"blocks.{n}.conv."
      _conv(sd, p + "inverted_bottleneck.conv.conv.weight", mid, cin, 1, rng)
      _bn(sd, p + "inverted_bottleneck.bn.bn.", mid, rng)
      _conv(sd, p + "depth_conv.conv.conv.weight", mid, 1, 7, rng)
      sd[p + "depth_conv.conv.7to5_matrix"] = (np.eye(25) + 0.1 * rng.normal(size=(25, 25))).astype(np.float32)
      sd[p + "depth_conv.conv.5to3_matrix"] = (np.eye(9) + 0.1 * rng.normal(size=(9, 9))).astype(np.float32)
      _bn(sd, p + "depth_conv.bn.bn.", mid, rng)
      if MBV3_SE[s + 1]:
        se = make_divisible(mid // 4)
        _conv(sd, p + "depth_conv.se.fc.reduce.weight", se, mid, 1, rng)
        sd[p + "depth_conv.se.fc.reduce.bias"] = rng.normal(0, 0.1, se).astype(np.float32)
        _conv(sd, p + "depth_conv.se.fc.expand.weight", mid, se, 1, rng)
        sd[p + "depth_conv.se.fc.expand.bias"] = rng.normal(0, 0.1, mid).astype(np.float32)
      _conv(sd, p + "point_linear.conv.conv.weight", cout, mid, 1, rng)
      _bn(sd, p + "point_linear.bn.bn.", cout, rng)
      n, cin = n + 1, cout
  _conv(sd, "final_expand_layer.conv.weight", w[7], cin, 1, rng)
  _bn(sd, "final_expand_layer.bn.", w[7], rng)
  _conv(sd, "feature_mix_layer.conv.weight", w[8], w[7], 1, rng)
  sd["classifier.linear.weight"] = (rng.normal(0, 1, (n_classes, w[8])) / np.sqrt(w[8])).astype(np.float32)
  sd["classifier.linear.bias"] = rng.normal(0, 0.1, n_classes).astype(np.float32)
  return sd


R50_WIDTH_MULTS = [0.65, 0.8, 1.0]
R50_EXPANDS = [0.2, 0.25, 0.35]
R50_BASE_DEPTHS = [2, 2, 4, 2]
R50_STAGE_WIDTHS = [256, 512, 1024, 2048]
R50_STRIDES = [1, 2, 2, 2]


def r50_widths():
  stem = [make_divisible(64 * w) for w in R50_WIDTH_MULTS]
  stem_mid = [make_divisible(c // 2) for c in stem]
  stages = [[make_divisible(b * w) for w in R50_WIDTH_MULTS] for b in R50_STAGE_WIDTHS]
  return stem_mid, stem, stages


def ofa_resnet50_state_dict(rng, n_classes=1000):
  """Random tensors under the keys of ``OFAResNets(depth_list=[0, 1, 2], expand_ratio_list=[0.2,
  0.25, 0.35], width_mult_list=[0.65, 0.8, 1.0]).state_dict()``."""
  stem_mid, stem, stages = r50_widths()
  sd = {}
  _conv(sd, "input_stem.0.conv.conv.weight", max(stem_mid), 3, 3, rng)
  _bn(sd, "input_stem.0.bn.bn.", max(stem_mid), rng)
  _conv(sd, "input_stem.1.conv.conv.conv.weight", max(stem_mid), max(stem_mid), 3, rng)
  _bn(sd, "input_stem.1.conv.bn.bn.", max(stem_mid), rng)
  _conv(sd, "input_stem.2.conv.conv.weight", max(stem), max(stem_mid), 3, rng)
  _bn(sd, "input_stem.2.bn.bn.", max(stem), rng)
  n, cin = 0, max(stem)
  for s, base in enumerate(R50_BASE_DEPTHS):
    cout = max(stages[s])
    mid = make_divisible(round(cout * max(R50_EXPANDS)))
    for i in range(base + 2):
      p = f"blocks.{n}."
      _conv(sd, p + "conv1.conv.conv.weight", mid, cin, 1, rng)
      _bn(sd, p + "conv1.bn.bn.", mid, rng)
      _conv(sd, p + "conv2.conv.conv.weight", mid, mid, 3, rng)
      _bn(sd, p + "conv2.bn.bn.", mid, rng)
      _conv(sd, p + "conv3.conv.conv.weight", cout, mid, 1, rng)
      _bn(sd, p + "conv3.bn.bn.", cout, rng)
      sd[p + "conv3.bn.bn.weight"] *= 0.3  # keeps 18 residual additions in a sane range
      if i == 0:
        _conv(sd, p + "downsample.conv.conv.weight", cout, cin, 1, rng)
        _bn(sd, p + "downsample.bn.bn.", cout, rng)
      n, cin = n + 1, cout
  sd["classifier.linear.linear.weight"] = (rng.normal(0, 1, (n_classes, cin)) / np.sqrt(cin)).astype(np.float32)
  sd["classifier.linear.linear.bias"] = rng.normal(0, 0.1, n_classes).astype(np.float32)
  return sd


# --------------------------------------------------------------------------- ops (NCHW, float64)


def conv2d(x, w, stride=1, groups=1):
  """F.conv2d(x, w, stride=stride, padding=k // 2, groups=groups) for groups in {1, C}."""
  k = w.shape[-1]
  p = k // 2
  n, c, h, wd = x.shape
  ho, wo = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  taps = [xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
          for i in range(k) for j in range(k)]
  if groups == 1:
    return np.einsum("ntchw,oct->nohw", np.stack(taps, 1), w.reshape(w.shape[0], c, k * k))
  assert groups == c and w.shape[1] == 1
  return sum(t * w[:, 0, i // k, i % k][None, :, None, None] for i, t in enumerate(taps))


def batch_norm(x, sd, prefix):
  c = x.shape[1]
  g = lambda n: sd[prefix + n][:c].astype(np.float64)[None, :, None, None]
  return (x - g("running_mean")) / np.sqrt(g("running_var") + EPS) * g("weight") + g("bias")


def relu(x):
  return np.maximum(x, 0)


def h_swish(x):
  return x * np.clip(x + 3, 0, 6) / 6


def h_sigmoid(x):
  return np.clip(x + 3, 0, 6) / 6


ACT = {"relu": relu, "h_swish": h_swish}


def max_pool_3x3_s2(x):
  n, c, h, w = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  return np.max([xp[:, :, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2]
                 for i in range(3) for j in range(3)], axis=0)


def avg_pool_ceil(x, s):
  """nn.AvgPool2d(s, s, padding=0, ceil_mode=True): windows over the edge average what they cover."""
  if s == 1:
    return x
  n, c, h, w = x.shape
  ho, wo = -(-h // s), -(-w // s)
  out = np.empty((n, c, ho, wo))
  for i in range(ho):
    for j in range(wo):
      out[:, :, i, j] = x[:, :, i * s:min(i * s + s, h), j * s:min(j * s + s, w)].mean(axis=(2, 3))
  return out


# --------------------------------------------------------------------------- forwards


def _f64(sd, key):
  return sd[key].astype(np.float64)


def _depthwise_filter(sd, prefix, mid, k):
  """DynamicSeparableConv2d.get_active_filter: crop the 7x7 kernel to 5x5 and apply 7to5 as
  F.linear (x @ M.T), then crop to 3x3 and apply 5to3."""
  filt = _f64(sd, prefix + "conv.conv.weight")[:mid]
  size = filt.shape[-1]
  for small in (5, 3):
    if size <= k:
      break
    start = (size - small) // 2
    crop = filt[:, :, start:start + small, start:start + small].reshape(mid, small * small)
    filt = (crop @ _f64(sd, prefix + f"conv.{size}to{small}_matrix").T).reshape(mid, 1, small, small)
    size = small
  return filt


def ofa_mbv3_forward(sd, x, ks, e, d, width_mult):
  """OFAMobileNetV3.forward after set_active_subnet(ks, e, d), eval mode. x: NCHW."""
  x = np.asarray(x, np.float64)
  w = mbv3_widths(width_mult)
  x = h_swish(batch_norm(conv2d(x, _f64(sd, "first_conv.conv.weight"), 2), sd, "first_conv.bn."))
  y = relu(batch_norm(conv2d(x, _f64(sd, "blocks.0.conv.depth_conv.conv.weight"), 1, x.shape[1]),
                      sd, "blocks.0.conv.depth_conv.bn."))
  x = x + batch_norm(conv2d(y, _f64(sd, "blocks.0.conv.point_linear.conv.weight")), sd,
                     "blocks.0.conv.point_linear.bn.")
  for s in range(5):
    for i in range(d[s]):
      n = 1 + 4 * s + i
      p, act = f"blocks.{n}.conv.", ACT[MBV3_ACTS[s + 1]]
      stride = MBV3_STRIDES[s + 1] if i == 0 else 1
      cin, cout = x.shape[1], w[s + 2]
      mid = make_divisible(round(cin * e[n - 1]))
      y = act(batch_norm(conv2d(x, _f64(sd, p + "inverted_bottleneck.conv.conv.weight")[:mid, :cin]),
                         sd, p + "inverted_bottleneck.bn.bn."))
      y = conv2d(y, _depthwise_filter(sd, p + "depth_conv.", mid, ks[n - 1]), stride, mid)
      y = act(batch_norm(y, sd, p + "depth_conv.bn.bn."))
      if MBV3_SE[s + 1]:
        se = make_divisible(mid // 4)
        pooled = y.mean(axis=(2, 3))
        q = p + "depth_conv.se.fc."
        h = relu(pooled @ _f64(sd, q + "reduce.weight")[:se, :mid, 0, 0].T
                 + _f64(sd, q + "reduce.bias")[:se])
        g = h_sigmoid(h @ _f64(sd, q + "expand.weight")[:mid, :se, 0, 0].T
                      + _f64(sd, q + "expand.bias")[:mid])
        y = y * g[:, :, None, None]
      y = batch_norm(conv2d(y, _f64(sd, p + "point_linear.conv.conv.weight")[:cout, :mid]), sd,
                     p + "point_linear.bn.bn.")
      x = x + y if stride == 1 and cin == cout else y
  x = h_swish(batch_norm(conv2d(x, _f64(sd, "final_expand_layer.conv.weight")), sd,
                         "final_expand_layer.bn."))
  x = x.mean(axis=(2, 3))
  x = h_swish(x @ _f64(sd, "feature_mix_layer.conv.weight")[:, :, 0, 0].T)
  return x @ _f64(sd, "classifier.linear.weight").T + _f64(sd, "classifier.linear.bias")


def ofa_resnet50_forward(sd, x, d, e, w):
  """OFAResNets.forward after set_active_subnet(d, e, w), eval mode. x: NCHW."""
  x = np.asarray(x, np.float64)
  stem_mid, stem, stages = r50_widths()
  c0, c1 = stem_mid[w[0]], stem[w[1]]

  def conv_bn(x, prefix, cout, stride=1):
    filt = _f64(sd, prefix + "conv.conv.weight")[:cout, :x.shape[1]]
    return batch_norm(conv2d(x, filt, stride), sd, prefix + "bn.bn.")

  x = relu(conv_bn(x, "input_stem.0.", c0, 2))
  if d[0] == 2:  # input_stem_skipping = d[0] != max(depth_list)
    x = x + relu(conv_bn(x, "input_stem.1.conv.", c0))
  x = relu(conv_bn(x, "input_stem.2.", c1))
  x = max_pool_3x3_s2(x)
  n = 0
  for s, base in enumerate(R50_BASE_DEPTHS):
    cout = stages[s][w[s + 2]]
    for i in range(base + d[s + 1]):
      p, stride = f"blocks.{n + i}.", R50_STRIDES[s] if i == 0 else 1
      mid = make_divisible(round(cout * e[n + i]))
      shortcut = conv_bn(avg_pool_ceil(x, stride), p + "downsample.", cout) if i == 0 else x
      y = relu(conv_bn(x, p + "conv1.", mid))
      y = relu(conv_bn(y, p + "conv2.", mid, stride))
      x = relu(conv_bn(y, p + "conv3.", cout) + shortcut)
    n += base + 2
  x = x.mean(axis=(2, 3))
  weight = _f64(sd, "classifier.linear.linear.weight")[:, :x.shape[1]]
  return x @ weight.T + _f64(sd, "classifier.linear.linear.bias")
