"""The supernet contract: what training, search, export and the tools may rely on.

Every supernet (:class:`ofajax.models.OFAMobileNetV3`, ``OFAResNet50``, ``SlimMobileNetV2``,
``ElasticViT``, ``ElasticBERT``) satisfies :class:`Supernet`; code that takes "a model" types it
so and reads these members instead of probing for attributes. The dense models that subnets
export to (``MobileNet``, ``ResNet``, and the transformers built with ``layers=``) provide
``num_classes`` and ``input_spec`` as well, so an input for any model comes from
``model.input_spec``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from ofajax.space import SearchSpace

INPUT_KINDS = ("image", "tokens")


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What a model reads: NHWC float32 images of ``channels`` channels, or int32 token ids
  [B, T] below ``vocab_size``. A "resolution" is the image side or the sequence length."""
  kind: str             # "image" (NHWC float32) or "tokens" (int32 ids [B, T])
  channels: int = 0     # image channels; 0 for tokens
  vocab_size: int = 0   # token vocabulary; 0 for images

  def __post_init__(self):
    if self.kind not in INPUT_KINDS:
      raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {self.kind!r}")

  def struct(self, resolution: int, batch: int = 1) -> jax.ShapeDtypeStruct:
    """Shape and dtype of ``batch`` inputs at ``resolution`` (``batch`` may be symbolic, as
    ``jax.export`` takes it)."""
    if self.kind == "tokens":
      return jax.ShapeDtypeStruct((batch, resolution), jnp.int32)
    return jax.ShapeDtypeStruct((batch, resolution, resolution, self.channels), jnp.float32)

  def sample(self, resolution: int, batch: int = 1) -> jax.Array:
    """A dummy input for ``init`` / ``eval_shape``: ones (for text a real token, not padding)."""
    spec = self.struct(resolution, batch)
    return jnp.ones(spec.shape, spec.dtype)


def check_channels(x, channels: int) -> None:
  """A ValueError naming the mismatch unless ``x`` is NHWC with ``channels`` channels (a model's
  kernels would otherwise silently take the input's channel count)."""
  if x.shape[-1] != channels:
    raise ValueError(f"input has {x.shape[-1]} channels; this model was built for "
                     f"in_channels={channels} (NHWC input expected)")


# How a supernet runs a traced arch. "masked": every layer at its maximum size, inactive
# channels and taps zeroed (one program for any arch; the reference, and the right choice where
# archs are vmapped side by side). "active": each elastic block computes only its active size,
# switching among static branches, so a small subnet costs less; same numbers as "masked".
EXECUTIONS = ("masked", "active")


def check_execution(execution: str, supported=EXECUTIONS) -> None:
  """A ValueError naming the choices unless ``execution`` is one this model runs."""
  if execution not in supported:
    raise ValueError(f"execution must be one of {supported} for this model (or 'auto'), got "
                     f"{execution!r}")


@runtime_checkable
class Supernet(Protocol):
  """An elastic supernet: one set of variables, every subnet of :meth:`search_space`.

  ``model.apply(variables, x, arch, train=...)`` runs the subnet ``arch`` (a traced pytree of
  int32 leaves, as the search space describes) on ``x`` (see :attr:`input_spec`) and returns
  logits [B, num_classes]. ``variables`` are ``{"params", "batch_stats"}`` (``batch_stats``
  empty for models without BatchNorm).
  """
  num_classes: int
  execution: str              # how it runs now: one of ``executions``
  executions: tuple[str, ...]  # the modes of EXECUTIONS this model has (a class attribute)

  @property
  def input_spec(self) -> InputSpec:
    """What ``x`` is (images of how many channels, or token ids)."""

  def search_space(self) -> SearchSpace:
    """The archs this supernet runs, with their leaves, choices and resolutions."""

  def __call__(self, x, arch, train: bool = False) -> jax.Array:
    """Logits of subnet ``arch``; called through ``model.apply``."""

  def dense_model(self, arch) -> Any:
    """The dense twin of a concrete ``arch``: a Flax model with static shapes, applied as
    ``apply(dense_variables, x, train=...)``."""

  def slice_variables(self, variables: dict, arch) -> dict:
    """The dense twin's variables: the supernet's, sliced to ``arch``."""

  def cost(self, arch, resolution: int) -> tuple[Any, Any]:
    """Analytic (MACs, params) of ``arch`` at ``resolution`` (OFA's counting convention);
    a traced arch gives traced numbers."""


__all__ = ["EXECUTIONS", "INPUT_KINDS", "InputSpec", "Supernet", "check_channels",
           "check_execution"]
