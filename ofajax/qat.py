"""Quantization-aware fine-tuning (QAT) of an int8 subnet from :func:`ofajax.quantize.quantize`.

Post-training quantization rounds each weight once to its channel's nearest int8 step, and each
activation to the step of its calibrated range. A short fine-tune with those roundings in the
forward pass lets the weights settle where the int8 model, not the float one, does well: the
loss is the int8 model's own cross-entropy, and gradients pass each rounding unchanged (the
straight-through estimator; Qwix's ``QtProvider`` does this for the int8 convs and dots, and
:func:`fake_quantized` here for every kernel, the depthwise ones included, which run as float
ops on int8 kernels).

Kept fixed, as the model will be served: the activation ranges (calibrated before), and the
BatchNorms (folded into the kernels, or eval-mode with their calibrated statistics). After the
fine-tune the kernels are quantized again (int8, one scale per output channel).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
import qwix

from ofajax import quantize


def fake_quantized(params: dict) -> dict:
  """``params`` whose kernels hold their int8 values times scale in the forward pass, with the
  gradient of the float kernels (straight-through)."""
  rounded = quantize.dequantize_kernels({"params": quantize.quantize_kernels(params)})["params"]
  return jax.tree.map(lambda w, q: w + jax.lax.stop_gradient(q - w), params, rounded)


def simulated_logits(qmodel: quantize.Int8Model, variables: dict, x):
  """The int8 model's logits computed in float32 with the same roundings (kernels per channel,
  inputs of the quantized modules at their static ranges), differentiable straight through
  them. ``variables``: float (dequantized) ones."""
  with quantize.folded_batchnorm(qmodel.folded), _quantized_inputs(qmodel.ranges):
    return qmodel.model.apply({**variables, "params": fake_quantized(variables["params"])}, x,
                              train=False)


def _quantized_inputs(ranges: dict):
  """Inside: each quantized module's input is rounded to the int8 step of its static range
  (Qwix's own quantizer: the numbers its int8 op sees), with a clipped straight-through
  gradient: unchanged inside the range, zero outside it."""
  def round_input(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and args and module.scope is not None:
      r = ranges.get("/".join(module.scope.path), 0.0)
      if r > 0.0:
        x = args[0]
        q = qwix.dequantize(qwix.quantize(x, quantize.QTYPE,
                                          calibration_method=f"fixed,{-r!r},{r!r}"))
        x = jnp.where(jnp.abs(x) <= r, x + jax.lax.stop_gradient(q - x),
                      jax.lax.stop_gradient(q))
        args = (x, *args[1:])
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(round_input)


def finetune(qmodel: quantize.Int8Model, batches: Iterable[dict], *, steps: int,
             learning_rate: float = 1e-4, teacher: Callable | None = None
             ) -> tuple[quantize.Int8Model, list[float]]:
  """``(fine-tuned int8 model, loss per step)``: ``steps`` Adam steps on ``batches``
  ({"inputs", "label"} training batches) of the int8 model's cross-entropy with the labels, or
  with ``teacher(inputs)``'s softmax where given (the float model: QAT then only learns to do
  what the float model does)."""
  if steps < 1:
    raise ValueError(f"steps (QAT fine-tune steps) must be >= 1, got {steps}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if qmodel.ranges is None:
    raise ValueError("QAT needs an int8 model with static activation ranges "
                     "(quantize.quantize(..., activations='static'), the default)")
  variables = quantize.dequantize_kernels(qmodel.variables)
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, inputs, labels):
    def loss_fn(p):
      logits = simulated_logits(qmodel, {**variables, "params": p}, inputs)
      if teacher is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      target = jax.nn.softmax(jax.lax.stop_gradient(teacher(inputs)))
      return optax.softmax_cross_entropy(logits, target).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, losses = variables["params"], []
  opt_state = optimizer.init(params)
  batches = iter(batches)
  for i in range(steps):
    try:
      batch = next(batches)
    except StopIteration:
      raise ValueError(f"the training batches ran out after {i} of {steps} QAT steps") from None
    params, opt_state, loss = step(params, opt_state, jnp.asarray(batch["inputs"]),
                                   jnp.asarray(batch["label"], jnp.int32))
    losses.append(float(loss))
    if not math.isfinite(losses[-1]):
      raise FloatingPointError(f"the int8 model's QAT loss became {losses[-1]} at step {i}: "
                               f"lower the learning rate (now {learning_rate})")
  tuned = {**qmodel.variables, "params": quantize.quantize_kernels(params)}
  return dataclasses.replace(qmodel, variables=tuned), losses
