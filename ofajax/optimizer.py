"""The optimizer of supernet training: SGD (OFA, US-Nets) or AdamW (DynaBERT), weight decay on
weights only, and one learning-rate schedule per phase joined into one."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from ofajax.phases import Phase


def decay_mask(params, depthwise: bool = True) -> Any:
  """Weight decay on weights only: not on BN scale / bias nor on any bias (OFA: 'bn#bias'),
  nor, with ``depthwise=False``, on depthwise kernels (US-Nets decays only regular convs and
  fully connected layers)."""
  def decays(path, _):
    names = [getattr(k, "key", "") for k in path]
    return names[-1] not in ("scale", "bias") and (depthwise or "depthwise" not in names)
  return jax.tree_util.tree_map_with_path(decays, params)


SCHEDULES = ("cosine", "linear")


def make_schedule(phases: list[Phase], kind: str = "cosine"):
  """Each phase restarts its own warmup + decay to 0 (cosine as OFA, or linear as US-Nets), as
  OFA's separate runs do."""
  if kind not in SCHEDULES:
    raise ValueError(f"config.lr_schedule must be one of {SCHEDULES}, got {kind!r}")

  def one(p):
    if kind == "cosine":
      return optax.warmup_cosine_decay_schedule(
          init_value=0.0 if p.warmup_steps else p.learning_rate, peak_value=p.learning_rate,
          warmup_steps=p.warmup_steps, decay_steps=p.steps, end_value=0.0)
    decay = optax.linear_schedule(p.learning_rate, 0.0, p.steps - p.warmup_steps)
    if not p.warmup_steps:
      return decay
    warmup = optax.linear_schedule(0.0, p.learning_rate, p.warmup_steps)
    return optax.join_schedules([warmup, decay], [p.warmup_steps])

  schedules = [one(p) for p in phases]
  boundaries = list(np.cumsum([p.steps for p in phases])[:-1])
  return optax.join_schedules(schedules, boundaries) if len(phases) > 1 else schedules[0]


def make_optimizer(config, schedule, params):
  parts, mask = [], decay_mask(params, config.get("decay_depthwise", True))
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  else:
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask))
  return optax.chain(*parts)
