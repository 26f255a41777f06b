"""Accuracy predictor (OFA): a small MLP on a one-hot arch encoding, trained on measured pairs.

Encoding: for every position of every leaf, a one-hot over the leaf's values; a position the
depth gates off is all zeros (OFA's encoding does the same for skipped blocks), so equal subnets
encode equally. With several input resolutions the resolution is one-hot too (OFA's
``arch_encoder.py`` appends the image size). OFA's predictor is 3 hidden layers of 400 ReLU
units plus a constant base accuracy; it is trained with MSE. Quality is reported on held-out pairs as RMSE and Kendall's
tau (what matters for search is the ranking).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


def encode(space, archs: Sequence[dict], resolutions: Sequence | None = None,
           choices: Sequence[int] = ()) -> np.ndarray:
  """[N, D] float32 one-hot encodings; with several resolution ``choices``, each arch's
  resolution (``resolutions[i]``) is one-hot too, as OFA's encoder appends the image size."""
  rows = []
  for i, arch in enumerate(archs):
    parts = []
    for leaf in space.leaves:
      value = np.asarray(arch[leaf.name])
      active = space.active(arch, leaf.name)
      onehot = (value[..., None] == np.asarray(leaf.values)) & active[..., None]
      parts.append(onehot.reshape(-1))
    if len(choices) > 1:
      parts.append(np.asarray(choices) == resolutions[i])
    rows.append(np.concatenate(parts))
  return np.asarray(rows, np.float32)


class MLP(nn.Module):
  """Predicts the standardised accuracy ``(acc - mean) / std`` of the training pairs: raw
  accuracies of one supernet differ by fractions of a point, and an unscaled fit extrapolated
  past 100% in our runs (held-out RMSE 4x worse than predicting the mean)."""
  hidden: Sequence[int] = (400, 400, 400)

  @nn.compact
  def __call__(self, x):
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(1)(x)[:, 0]


def kendall_tau(a, b) -> float:
  """Kendall's tau-b (ties in either ranking are allowed; many accuracies tie)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  da = np.sign(a[:, None] - a[None, :])
  db = np.sign(b[:, None] - b[None, :])
  upper = np.triu_indices(len(a), 1)
  da, db = da[upper], db[upper]
  denom = np.sqrt(np.sum(da != 0) * np.sum(db != 0))
  return float(np.sum(da * db) / denom) if denom else 0.0


class Predictor:
  """``Predictor(space).fit(archs, accs)``; then ``predictor(archs) -> np.ndarray``. With
  several resolution ``choices`` an arch's accuracy depends on its resolution too: pass
  ``resolutions`` (one per arch) to ``fit`` and to the call."""

  def __init__(self, space, hidden: Sequence[int] = (400, 400, 400), seed: int = 0,
               choices: Sequence[int] = ()):
    self.space, self.hidden, self.seed = space, tuple(hidden), seed
    self.choices = tuple(choices)
    self.params = None

  def _encode(self, archs, resolutions) -> np.ndarray:
    if len(self.choices) > 1 and (resolutions is None or None in resolutions):
      raise ValueError(f"this predictor is fitted over resolutions {self.choices}: pass each "
                       "arch's resolution")
    return encode(self.space, archs, resolutions, self.choices)

  def fit(self, archs, accs, resolutions=None, steps: int = 500, learning_rate: float = 1e-3,
          batch_size: int = 64) -> "Predictor":
    x, y = self._encode(archs, resolutions), np.asarray(accs, np.float32)
    if len(x) < 2:
      raise ValueError(f"the predictor needs at least 2 measured archs, got {len(x)}")
    self.mean, self.std = float(y.mean()), float(y.std()) or 1.0
    y = (y - self.mean) / self.std
    self.model = MLP(self.hidden)
    key = jax.random.key(self.seed)
    params = self.model.init(key, x[:1])
    tx = optax.adam(learning_rate)
    opt = tx.init(params)
    model = self.model

    @jax.jit
    def train(params, opt, x, y, key):
      def step(carry, k):
        params, opt = carry
        idx = jax.random.choice(k, x.shape[0], (min(batch_size, x.shape[0]),), replace=False)
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean((model.apply(p, x[idx]) - y[idx]) ** 2))(params)
        updates, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, updates), opt), loss
      (params, opt), losses = jax.lax.scan(step, (params, opt), jax.random.split(key, steps))
      return params, losses

    self.params, self.losses = train(params, opt, jnp.asarray(x), jnp.asarray(y),
                                     jax.random.fold_in(key, 1))
    self._apply = jax.jit(model.apply)
    return self

  def __call__(self, archs, resolutions=None) -> np.ndarray:
    if self.params is None:
      raise RuntimeError("Predictor.fit must run before prediction")
    x = self._encode(archs, resolutions)
    # Pad to a power of two: evolution asks for ever-changing counts, each would recompile.
    size = max(64, 1 << (len(x) - 1).bit_length())
    padded = np.zeros((size, x.shape[1]), np.float32)
    padded[:len(x)] = x
    z = np.asarray(self._apply(self.params, jnp.asarray(padded)))[:len(x)]
    return z * self.std + self.mean


def fit_and_report(space, archs, accs, holdout_fraction: float = 0.2, seed: int = 0,
                   hidden: Sequence[int] = (400, 400, 400), resolutions=None,
                   choices: Sequence[int] = (), **fit_options) -> tuple[Predictor, dict]:
  """Fits on a random (1 - holdout) part and reports RMSE / Kendall tau on the rest, then refits
  on every pair for use in search. ``resolutions``: each arch's, over the ``choices`` the
  search offers. ``fit_options`` go to :meth:`Predictor.fit`."""
  n = len(archs)
  order = np.random.default_rng(seed).permutation(n)
  n_test = max(2, int(round(holdout_fraction * n)))
  if n - n_test < 2:
    raise ValueError(f"{n} measured archs are too few to fit and check a predictor; measure "
                     f"at least {n_test + 2}")
  test, train = order[:n_test], order[n_test:]
  accs = np.asarray(accs, np.float32)
  res = [None] * n if resolutions is None else list(resolutions)
  pick = lambda idx: ([archs[i] for i in idx], [res[i] for i in idx])
  train_archs, train_res = pick(train)
  held = Predictor(space, hidden, seed, choices).fit(train_archs, accs[train], train_res,
                                                     **fit_options)
  pred, truth = held(*pick(test)), accs[test]
  report = {"num_train": int(len(train)), "num_test": int(n_test),
            "rmse": float(np.sqrt(np.mean((pred - truth) ** 2))),
            "kendall_tau": kendall_tau(pred, truth),
            # what always predicting the training mean would score: the bar to beat
            "constant_baseline_rmse": float(np.sqrt(np.mean((accs[train].mean() - truth) ** 2)))}
  return Predictor(space, hidden, seed, choices).fit(archs, accs, res, **fit_options), report
