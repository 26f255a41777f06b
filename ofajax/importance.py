"""Head and FFN-neuron importance of an elastic transformer supernet, and re-ordering by it.

DynaBERT (Hou et al., NeurIPS 2020) trains width-elastic transformers whose narrow subnets keep
the *first* heads and neurons of every layer; before that it re-orders each layer so those
prefixes hold the units that matter most. Importance is a first-order estimate of how much the
loss would change if a unit were removed:

* a head's importance is ``|dL / d s_h|``, where ``s_h`` (1 by default) multiplies head h's
  context vector (Michel et al., NeurIPS 2019, "Are Sixteen Heads Really Better than One?");
* an FFN neuron's importance is ``|sum_w w * dL/dw|`` over the neuron's own weights (its ``fc1``
  kernel column and bias, its ``fc2`` kernel row): the Taylor estimate of the loss change when
  all of them are set to zero (Molchanov et al., 2017).

Both are taken per batch and the absolute values summed over batches (float32), with L the mean
cross-entropy of the full network in eval mode. Re-ordering permutes the parameters with
:func:`ofajax.layers.transformer.permute_layer`, so the full network computes the same function.

    variables, importance = reorder_by_importance(model, variables, batches)

CNN supernets (OFA's MobileNetV3 and ResNet50, slimmable MobileNetV2) sort their blocks' middle
channels by weight magnitude instead: :func:`sort_channels`, from :mod:`ofajax.channel_sorting`.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ofajax import losses
from ofajax import channel_sorting
from ofajax.elastic import ElasticNet
from ofajax.elastic import sorting as elastic_sorting
from ofajax.layers import transformer
from ofajax.models.encoder import ElasticEncoderMixin


def sort_channels(model, variables, *, expand_stage: int = 0) -> dict:
  """CNN supernets' channels in descending L1 importance, the full network unchanged: OFA's
  rule for the built-in CNNs (:mod:`ofajax.channel_sorting`), every elastic channel group for
  an elasticized model (:mod:`ofajax.elastic.sorting`; it has no expand stages)."""
  if isinstance(model, ElasticNet):
    return elastic_sorting.sort_channels(model, variables)
  return channel_sorting.sort_channels(model, variables, expand_stage=expand_stage)


def _check_transformer(model, variables) -> int:
  """The number of layers, or a ValueError if this is not an elastic transformer supernet."""
  params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
  layer0 = params.get("layer0")
  if (not isinstance(model, ElasticEncoderMixin) or not isinstance(layer0, Mapping)
      or "attention" not in layer0 or "ffn" not in layer0):
    raise ValueError(f"{type(model).__name__} is not an elastic transformer supernet: importance "
                     "needs params 'layer0', 'layer1', ... with 'attention' and 'ffn' sub-dicts")
  if model.layers:
    raise ValueError("importance is measured on the supernet, not on a dense subnet "
                     f"(this {type(model).__name__} was built with layers=...)")
  num_layers = int(model.num_layers)
  missing = [f"layer{i}" for i in range(num_layers) if f"layer{i}" not in params]
  if missing:
    raise ValueError(f"variables lack {missing} of the model's {num_layers} layers")
  return num_layers


@functools.lru_cache(maxsize=8)
def _batch_importance_fn(model, num_layers: int):
  """jit: (params, extra collections, inputs, labels, mask, arch) -> (head [L, H], ffn [L, F])
  importance of one batch, absolute values taken. Cached per model (flax modules hash by their
  fields), so measuring again, e.g. after re-ordering, does not compile again."""

  def loss_fn(params, head_scale, rest, inputs, labels, mask, arch):
    logits = model.apply({"params": params, **rest}, inputs, arch, train=False,
                         head_scale=head_scale)
    return losses.cross_entropy(logits.astype(jnp.float32), labels, weights=mask)

  @jax.jit
  def batch_importance(params, rest, inputs, labels, mask, arch):
    head_scale = jnp.ones((num_layers, model.num_heads), jnp.float32)
    grad_params, grad_scale = jax.grad(loss_fn, argnums=(0, 1))(
        params, head_scale, rest, inputs, labels, mask, arch)
    neurons = []
    for i in range(num_layers):
      w, g = params[f"layer{i}"]["ffn"], grad_params[f"layer{i}"]["ffn"]
      wg = lambda name, part: (w[name][part] * g[name][part]).astype(jnp.float32)
      taylor = (wg("fc1", "kernel").sum(0)      # column j of fc1 [D, F]
                + wg("fc1", "bias")             # bias j of fc1 [F]
                + wg("fc2", "kernel").sum(1))   # row j of fc2 [F, D]
      neurons.append(jnp.abs(taylor))
    return jnp.abs(grad_scale).astype(jnp.float32), jnp.stack(neurons)

  return batch_importance


def measure(model, variables: dict, batches: Iterable[Mapping], arch=None) -> dict:
  """``{"heads": float32 [L, H], "ffn": float32 [L, F]}`` summed over ``batches``.

  ``batches``: an iterable of ``{"inputs": inputs, "label": int labels}`` (``"mask"``, if
  present, weights the examples, so padded eval batches count only their real examples).
  ``arch`` defaults to the largest; at a smaller arch, heads and neurons it does not run get
  importance 0. One compiled gradient function serves every batch of the same shape.
  """
  num_layers = _check_transformer(model, variables)
  arch = model.search_space().largest() if arch is None else arch
  arch = jax.tree.map(jnp.asarray, dict(arch))
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params" and v}
  batch_importance = _batch_importance_fn(model, num_layers)
  heads = np.zeros((num_layers, model.num_heads), np.float32)
  ffn = np.zeros((num_layers, model.ffn_dim), np.float32)
  count = 0
  for batch in batches:
    if "inputs" not in batch or "label" not in batch:
      raise ValueError(f"a batch needs 'inputs' and 'label', got keys {sorted(batch)}")
    labels = jnp.asarray(batch["label"])
    mask = batch.get("mask")
    mask = None if mask is None else jnp.asarray(mask, jnp.float32)
    h, f = batch_importance(params, rest, jnp.asarray(batch["inputs"]), labels, mask, arch)
    heads += np.asarray(h, np.float32)
    ffn += np.asarray(f, np.float32)
    count += 1
  if count == 0:
    raise ValueError("importance needs at least one batch; got none")
  return {"heads": heads, "ffn": ffn}


def orders(importance: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """Per layer, the head and neuron orders (most important first, ties in original order):
  ``order[i, j]`` is the old index of the unit that goes to position j of layer i."""
  descending = lambda x: np.argsort(-np.asarray(x, np.float64), axis=-1, kind="stable")
  return descending(importance["heads"]), descending(importance["ffn"])


def reorder(model, variables: dict, importance: Mapping) -> dict:
  """``variables`` with every layer's heads and FFN neurons in descending ``importance``.

  Only the layers' parameters move, so the full network's outputs are unchanged; the prefixes
  that narrow subnets keep now hold the most important units.
  """
  num_layers = _check_transformer(model, variables)
  head_order, neuron_order = orders(importance)
  want = {"heads": (num_layers, model.num_heads), "ffn": (num_layers, model.ffn_dim)}
  got = {"heads": head_order.shape, "ffn": neuron_order.shape}
  if got != want:
    raise ValueError(f"importance shapes {got} do not match the model's {want}")
  params = dict(variables["params"])
  for i in range(num_layers):
    params[f"layer{i}"] = transformer.permute_layer(params[f"layer{i}"], head_order[i],
                                                    neuron_order[i])
  return {**variables, "params": params}


def reorder_by_importance(model, variables: dict, batches: Iterable[Mapping],
                          arch=None) -> tuple[dict, dict]:
  """:func:`measure` then :func:`reorder`: ``(reordered variables, importance)``, the
  importance in the original (pre-reorder) unit order."""
  importance = measure(model, variables, batches, arch)
  return reorder(model, variables, importance), importance


__all__ = ["measure", "orders", "reorder", "reorder_by_importance", "sort_channels"]
