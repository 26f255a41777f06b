"""The jitted GAN step: the (elastic) generator and the discriminator updated together.

pix2pix's objective on paired data: the generator fools a conditional PatchGAN discriminator
(LSGAN or hinge) and reconstructs the target (L1, weight ``l1_weight``); with a teacher it also
matches the teacher's intermediate features through adapters (``ofajax.feature_distill``, GAN
Compression). The generator may be a supernet: a step runs up to ``max_subnets`` subnets of the
phase (sandwich rule: the largest, the smallest, random ones), sums their generator gradients
(as the classifier step does) and shows the discriminator every active subnet's fakes.

Both players take their gradients at the step's starting parameters (simultaneous updates), so
one forward of each subnet serves both; pix2pix alternates (the discriminator first), which
needs a second generator forward per subnet.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from ofajax import distributed
from ofajax import feature_distill
from ofajax.phases import sample_archs

GAN_LOSSES = ("lsgan", "hinge")


@flax.struct.dataclass
class GanState:
  """The generator's state (as ``ofajax.workdir.TrainState``: ``params`` and ``batch_stats``
  are the generator's, so ``load_supernet`` reads a GAN workdir like any other), plus the
  discriminator and the distillation adapters."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any            # the generator optimizer's, over {"generator", "adapters"}
  rng: jax.Array
  disc_params: Any
  disc_opt_state: Any
  adapters: Any             # {} without feature distillation

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def discriminator_loss(kind: str, real_logits, fake_logits) -> jax.Array:
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
  # LSGAN (Mao et al. 2017), pix2pix / CycleGAN's default: real -> 1, fake -> 0; halved as
  # pix2pix halves the discriminator's loss.
  return 0.5 * (jnp.mean((real_logits - 1.0) ** 2) + jnp.mean(fake_logits ** 2))


def generator_adversarial_loss(kind: str, fake_logits) -> jax.Array:
  if kind == "hinge":
    return -jnp.mean(fake_logits)
  return jnp.mean((fake_logits - 1.0) ** 2)


@dataclasses.dataclass(frozen=True)
class GanLossOptions:
  gan_loss: str
  gan_weight: float
  l1_weight: float
  feature_weight: float
  layers: tuple[str, ...]   # distilled feature layers (empty: no feature distillation)

  @classmethod
  def from_config(cls, config) -> "GanLossOptions":
    if config.gan.loss not in GAN_LOSSES:
      raise ValueError(f"config.gan.loss must be one of {GAN_LOSSES}, got {config.gan.loss!r}")
    layers = tuple(config.gan.distill_layers) if config.distill == "teacher" else ()
    return cls(config.gan.loss, float(config.gan.gan_weight), float(config.gan.l1_weight),
               float(config.gan.feature_weight), layers)


def generator_forward(model, opts: GanLossOptions, variables, arch, edges, train: bool):
  """(fake images, {layer: feature}, updated batch_stats) of one subnet."""
  (fake, features), updates = feature_distill.apply_with_features(
      model, variables, edges, arch, opts.layers, train=train, mutable=["batch_stats"])
  return fake, features, updates.get("batch_stats", variables["batch_stats"])


def make_gan_step(model, space, disc, config, g_tx, d_tx, max_subnets: int,
                  teacher: Callable | None = None, mesh=None):
  """The jitted ``(state, edges, targets, phase, resolution=) -> (state, metrics)``.

  ``teacher``: None or ``edges -> {layer: feature}`` (frozen) when distilling features."""
  opts = GanLossOptions.from_config(config)

  def subnet_loss(trainable, batch_stats, disc_params, arch, edges, targets, teacher_features):
    variables = {"params": trainable["generator"], "batch_stats": batch_stats}
    fake, features, batch_stats = generator_forward(model, opts, variables, arch, edges, True)
    adversarial = generator_adversarial_loss(opts.gan_loss,
                                             disc.apply(disc_params, edges, fake))
    l1 = jnp.mean(jnp.abs(fake - targets))
    loss = opts.gan_weight * adversarial + opts.l1_weight * l1
    feature = jnp.float32(0.0)
    if opts.layers:
      feature = feature_distill.feature_loss(trainable["adapters"], features, teacher_features)
      loss = loss + opts.feature_weight * feature
    return loss, (fake, batch_stats, {"adversarial": adversarial, "l1": l1, "feature": feature})

  grad_fn = jax.value_and_grad(subnet_loss, has_aux=True)

  def disc_loss(disc_params, edges, targets, fakes, active):
    real = disc.apply(disc_params, edges, targets)
    losses = jnp.stack([discriminator_loss(opts.gan_loss, real, disc.apply(disc_params, edges, f))
                        for f in fakes])
    return jnp.sum(losses * active) / jnp.sum(active)

  def step(state: GanState, edges, targets, phase, resolution: int):
    del resolution  # paired images keep their size
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    archs = sample_archs(space, key, phase, max_subnets)
    teacher_features = teacher(edges) if (teacher is not None and opts.layers) else {}
    trainable = {"generator": state.params, "adapters": state.adapters}
    grads, batch_stats, fakes, active, parts = _accumulate(
        grad_fn, trainable, state, archs, phase["num_subnets"], max_subnets,
        (edges, targets, teacher_features))
    d_loss, d_grads = jax.value_and_grad(disc_loss)(state.disc_params, edges, targets, fakes,
                                                    active)
    updates, opt_state = g_tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    d_updates, d_opt_state = d_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    new_state = state.replace(
        step=state.step + 1, params=trainable["generator"], adapters=trainable["adapters"],
        batch_stats=batch_stats, opt_state=opt_state,
        disc_params=optax.apply_updates(state.disc_params, d_updates), disc_opt_state=d_opt_state)
    return new_state, _metrics(opts, parts, active, d_loss)

  if mesh is None:
    return jax.jit(step, donate_argnums=0, static_argnames="resolution")
  rep = distributed.replicated(mesh)  # the state stays replicated step after step
  return jax.jit(step, donate_argnums=0, static_argnames="resolution", out_shardings=(rep, rep))


def _accumulate(grad_fn, trainable, state: GanState, archs, num_subnets, max_subnets: int,
                batch):
  """Summed generator gradients over the step's subnets, unrolled (XLA:CPU runs convolutions
  inside loops many times slower, see ``ofajax.train_step``); slots beyond ``num_subnets`` are
  computed and discarded. Returns (grads, batch_stats, fakes, active mask, loss parts)."""
  edges, targets, teacher_features = batch
  grads = jax.tree.map(jnp.zeros_like, trainable)
  batch_stats, fakes, active, parts = state.batch_stats, [], [], []
  for i in range(max_subnets):
    arch = jax.tree.map(lambda a, i=i: a[i], archs)
    on = i < num_subnets
    (_, (fake, new_stats, part)), g = grad_fn(trainable, batch_stats, state.disc_params, arch,
                                              edges, targets, teacher_features)
    grads = jax.tree.map(lambda a, b, on=on: a + jnp.where(on, b, 0.0), grads, g)
    batch_stats = jax.tree.map(lambda n, o, on=on: jnp.where(on, n, o), new_stats, batch_stats)
    fakes.append(jax.lax.stop_gradient(fake))
    active.append(on)
    parts.append(part)
  return grads, batch_stats, fakes, jnp.stack(active).astype(jnp.float32), parts


def _metrics(opts: GanLossOptions, parts: list[dict], active, d_loss) -> dict:
  """The step's logged values: loss terms averaged over the active subnets."""
  mean = lambda k: sum(p[k] * a for p, a in zip(parts, active)) / jnp.sum(active)  # noqa: E731
  l1, adversarial, feature = mean("l1"), mean("adversarial"), mean("feature")
  return {"loss": opts.gan_weight * adversarial + opts.l1_weight * l1
          + opts.feature_weight * feature, "l1": l1, "adversarial": adversarial,
          "feature": feature, "l1_largest": parts[0]["l1"], "disc_loss": d_loss}
