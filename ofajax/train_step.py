"""The jitted train step: the loss of one subnet, accumulation over the subnets of a step, the
update.

One step serves every phase: a phase is *data* (its space's tables, its largest and smallest
arch, how many subnets to run, how to sample them), so progressive shrinking never recompiles.
Only the input resolution is static.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ofajax import distributed, feature_distill, losses, precision
from ofajax import workdir as workdir_lib
from ofajax.phases import sample_archs
from ofajax.workdir import TrainState


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """What the loss of one subnet needs from the config (static: part of the compiled step)."""
  label_smoothing: float
  kd_weight: float
  kd_temperature: float
  kd_loss: str                 # "soft_ce" | "kl"
  hidden_weight: float         # transformers: MSE of kept layers' outputs to the teacher's
  embedding_weight: float      # transformers: MSE of the embedding output to the teacher's
  inplace: bool                # the largest subnet teaches the others (US-Nets)
  inplace_ce_weight: float     # weight of the labels for the taught subnets when in place
  teacher_ce_weight: float     # weight of the labels with an external teacher (DynaBERT: 0)
  dtype: Any                   # compute dtype
  features: tuple[str, ...] = ()   # layers distilled from the teacher through adapters
  feature_weight: float = 1.0

  @classmethod
  def from_config(cls, config) -> "LossOptions":
    return cls(label_smoothing=config.label_smoothing, kd_weight=config.kd_weight,
               kd_temperature=config.kd_temperature, kd_loss=config.get("kd_loss", "soft_ce"),
               hidden_weight=config.get("hidden_mse_weight", 0.0),
               embedding_weight=config.get("embedding_mse_weight", 0.0),
               inplace=config.distill == "inplace",
               inplace_ce_weight=config.get("inplace_ce_weight", 0.0),
               teacher_ce_weight=config.get("teacher_ce_weight", 1.0),
               dtype=precision.compute_dtype(config.get("compute_dtype", "float32")),
               features=feature_distill.parse_names(config.get("distill_features", ())),
               feature_weight=float(config.get("feature_weight", 1.0)))

  @property
  def hidden(self) -> bool:
    return bool(self.hidden_weight or self.embedding_weight)


def subnet_loss(model, opts: LossOptions, params, adapters, batch_stats, arch, inputs, labels,
                teacher, ce_weight, kd_on, hidden_scale, key):
  """Loss of one subnet and (its outputs, its updated batch_stats, its feature MSE).

  ``teacher``: None, or {"logits"} (+ "extra": hidden states, + "features": {layer: output},
  when distilling them); ``adapters``: feature distillation's ({} without it); ``kd_on`` scales
  the distillation terms (0 for the in-place teacher itself); ``hidden_scale`` (the phase's)
  scales the hidden-state terms further."""
  if opts.dtype != jnp.float32:
    params = precision.cast_params(params, batch_stats, opts.dtype)
  if jnp.issubdtype(inputs.dtype, jnp.floating):  # token ids keep their integer type
    inputs = inputs.astype(opts.dtype)
  with precision.policy(opts.dtype, batch_stats):
    (out, features), updates = feature_distill.apply_with_features(
        model, {"params": params, "batch_stats": batch_stats}, inputs, arch, opts.features,
        train=True, mutable=["batch_stats"], rngs={"dropout": key},
        **({"return_hidden": True} if opts.hidden else {}))
  logits, extra = out if opts.hidden else (out, None)
  logits = logits.astype(jnp.float32)
  loss = ce_weight * losses.cross_entropy(logits, labels, opts.label_smoothing)
  if teacher is not None:
    kd = losses.kl_divergence if opts.kd_loss == "kl" else losses.distillation
    loss = loss + kd_on * opts.kd_weight * kd(logits, teacher["logits"], opts.kd_temperature)
    if opts.hidden:
      hidden_loss, embed_loss = losses.hidden_state_mse(extra, teacher["extra"])
      hidden = opts.hidden_weight * hidden_loss + opts.embedding_weight * embed_loss
      loss = loss + kd_on * hidden_scale * hidden
  feature = jnp.float32(0.0)
  if opts.features:
    features = {k: v.astype(jnp.float32) for k, v in features.items()}
    feature = feature_distill.feature_loss(adapters, features, teacher["features"])
    loss = loss + kd_on * opts.feature_weight * feature
  return loss, ((logits, extra), updates.get("batch_stats", batch_stats), feature)


def _empty_teacher_slot(model, opts: LossOptions, state: TrainState, inputs, largest) -> dict:
  """Zeros shaped like the in-place teacher's outputs (logits, + hidden states), which subnet 0
  (the largest) fills for the others."""
  slot = {"logits": jax.ShapeDtypeStruct((inputs.shape[0], model.num_classes), jnp.float32)}
  if opts.hidden:
    slot["extra"] = jax.eval_shape(
        lambda p: model.apply({"params": p, "batch_stats": state.batch_stats}, inputs, largest,
                              train=False, return_hidden=True)[1], state.params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), slot)


def accumulate_subnets(grad_fn: Callable, opts: LossOptions, state: TrainState, inputs, labels,
                       archs, keys, phase, external_teacher, teacher_slot,
                       unrolled: bool = False):
  """Summed gradients over the stacked subnets, one at a time in a ``lax.scan`` (memory of one
  subnet, one copy of forward + backward in the compiled step); subnets beyond ``num_subnets``
  are skipped with ``lax.cond`` (``phase``: the phase's data). ``unrolled``: one inlined copy
  per subnet and no control flow, subnets beyond ``num_subnets`` computed and discarded (see
  ``SUBNET_LOOPS``). Gradients are (params', adapters') ({} adapters without feature
  distillation). Returns (grads, batch_stats, summed loss, subnet 0's loss, summed feature
  MSE)."""
  adapters = getattr(state, "adapters", {})

  def body(carry, xs):
    arch, key, i = xs

    def run(carry):
      grads, batch_stats, total, first_loss, slot, feature_total = carry
      if opts.inplace:  # subnet 0 learns from the labels, the others from its output
        teacher, weight = slot, jnp.where(i == 0, 0.0, 1.0)
        ce_weight = jnp.where(i == 0, 1.0, opts.inplace_ce_weight)
      else:
        ce_weight = opts.teacher_ce_weight if external_teacher is not None else 1.0
        teacher, weight = external_teacher, 1.0
      (loss, ((logits, extra), batch_stats, feature)), g = grad_fn(
          state.params, adapters, batch_stats, arch, inputs, labels, teacher, ce_weight, weight,
          phase["hidden_scale"], key)
      if opts.inplace:
        new = {"logits": logits, **({"extra": extra} if opts.hidden else {})}
        slot = jax.tree.map(lambda n, o: jnp.where(i == 0, jax.lax.stop_gradient(n), o),
                            new, slot)
      first_loss = jnp.where(i == 0, loss, first_loss)
      return (jax.tree.map(jnp.add, grads, g), batch_stats, total + loss, first_loss, slot,
              feature_total + feature)

    if unrolled:
      on = i < phase["num_subnets"]
      return jax.tree.map(lambda n, o: jnp.where(on, n, o), run(carry), carry), None
    return jax.lax.cond(i < phase["num_subnets"], run, lambda c: c, carry), None

  init = (jax.tree.map(jnp.zeros_like, (state.params, adapters)), state.batch_stats,
          jnp.float32(0.0), jnp.float32(0.0), teacher_slot, jnp.float32(0.0))
  xs = (archs, keys, jnp.arange(keys.shape[0]))
  (grads, batch_stats, total, first_loss, _, feature_total), _ = jax.lax.scan(
      body, init, xs, unroll=unrolled)
  return grads, batch_stats, total, first_loss, feature_total


# How the step runs its subnets. "scan": a lax.scan with a lax.cond per subnet (one copy of the
# forward + backward in the program, memory of one subnet). "unrolled": inlined, no control flow.
# XLA:CPU runs lax convolutions inside loops and conditionals many times slower than at top
# level (measured on 2 cores, a 3-conv CNN, batch 128, 3 subnets: 7.1 s a step in a scan, 2.3 s
# without the masking, 0.55 s unrolled), and the built-in supernets avoid lax convolutions
# beyond their stem; a model made with ofajax.elasticize keeps the user's. "auto": unrolled for
# elasticized models on CPU, scan otherwise.
SUBNET_LOOPS = ("auto", "scan", "unrolled")


def unroll_subnets(config) -> bool:
  loop = config.get("subnet_loop", "auto")
  if loop not in SUBNET_LOOPS:
    raise ValueError(f"config.subnet_loop must be one of {SUBNET_LOOPS}, got {loop!r}")
  if loop == "auto":
    return config.model == workdir_lib.ELASTICIZE and jax.default_backend() == "cpu"
  return loop == "unrolled"


def apply_update(tx, state: TrainState, grads, batch_stats, adapter_tx=None) -> TrainState:
  """One update of the parameters (``grads``: (params', adapters')), and of the adapters by
  their own optimizer when the state has them (``ofajax.workdir.DistillState``)."""
  param_grads, adapter_grads = grads
  updates, opt_state = tx.update(param_grads, state.opt_state, state.params)
  state = state.replace(params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1)
  if adapter_tx is None:
    return state
  updates, adapter_opt_state = adapter_tx.update(adapter_grads, state.adapter_opt_state,
                                                 state.adapters)
  return state.replace(adapters=optax.apply_updates(state.adapters, updates),
                       adapter_opt_state=adapter_opt_state)


def make_train_step(model, space, config, tx, max_subnets: int, teacher=None, mesh=None,
                    adapter_tx=None):
  """The jitted step ``(state, inputs, labels, phase, resolution=) -> (state, metrics)``.

  Runs up to ``max_subnets`` subnets on the same batch and applies one update with the summed
  gradients. Subnet 0 is the largest under the sandwich rule (then 1 is the smallest and the
  rest random), otherwise all are random from the phase's space. With in-place distillation
  subnet 0 learns from the labels and the others from its detached output (plus
  ``inplace_ce_weight`` x the labels); with an external ``teacher`` (inputs -> {"logits", ...})
  every subnet learns from the labels and the teacher, and with ``config.distill_features``
  also from its intermediate features (the state is then a ``DistillState``, its adapters
  updated by ``adapter_tx``).

  With a ``mesh`` the step takes the state and phase replicated and inputs / labels split over
  its "data" axis (global arrays placed by ``ofajax.distributed``) and returns the state
  replicated; XLA adds the gradient all-reduce, and BatchNorm statistics and the loss are those
  of the global batch.
  """
  opts = LossOptions.from_config(config)
  grad_fn = jax.value_and_grad(functools.partial(subnet_loss, model, opts), argnums=(0, 1),
                               has_aux=True)
  unrolled = unroll_subnets(config)

  def step(state: TrainState, inputs, labels, phase, resolution: int):
    if inputs.ndim == 4 and inputs.shape[1] != resolution:  # images (token ids never resize)
      inputs = jax.image.resize(inputs, (inputs.shape[0], resolution, resolution,
                                         inputs.shape[-1]), "bilinear")
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    arch_key, drop_key = jax.random.split(key)
    archs = sample_archs(space, arch_key, phase, max_subnets)
    slot = _empty_teacher_slot(model, opts, state, inputs, phase["largest"])
    grads, batch_stats, total, first_loss, feature_total = accumulate_subnets(
        grad_fn, opts, state, inputs, labels, archs, jax.random.split(drop_key, max_subnets),
        phase, None if teacher is None else teacher(inputs), slot, unrolled)
    metrics = {"loss": total / phase["num_subnets"], "loss_largest": first_loss,
               "grad_norm": optax.tree.norm(grads[0])}
    if opts.features:
      metrics["feature"] = feature_total / phase["num_subnets"]
    return apply_update(tx, state, grads, batch_stats, adapter_tx), metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0, static_argnames="resolution")
  # Inputs arrive already placed (distributed.replicate / shard_batch): in_shardings would
  # forbid passing the static resolution by keyword. The outputs are pinned so the state stays
  # replicated step after step.
  rep = distributed.replicated(mesh)
  return jax.jit(step, donate_argnums=0, static_argnames="resolution", out_shardings=(rep, rep))

