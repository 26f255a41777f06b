"""Supernet registry: ``model, space = ofajax.models.get(name, **overrides)``."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

import jax

from ofajax.models import elastic_bert as _elastic_bert
from ofajax.models import elastic_vit as _elastic_vit
from ofajax.models.elastic_bert import ElasticBERT
from ofajax.models.elastic_vit import ElasticViT
from ofajax.models.mobilenet import MobileNet
from ofajax.models.ofa_mbv3 import OFAMobileNetV3
from ofajax.models import ofa_mbv3 as _ofa_mbv3
from ofajax.models import ofa_resnet50 as _ofa_resnet50
from ofajax.models.ofa_resnet50 import OFAResNet50
from ofajax.models.base import InputSpec, Supernet, check_execution
from ofajax.models.resnet import ResNet
from ofajax.models import slim_mobilenet_v2 as _slim
from ofajax.models.slim_mobilenet_v2 import SlimMobileNetV2
from ofajax.space import SearchSpace

# name -> (model class, default field overrides, how the space is made from the model)
_REGISTRY: dict[str, tuple[type, dict, Callable]] = {
    "ofa_mbv3": (OFAMobileNetV3, {}, lambda m: m.search_space()),
    "ofa_mbv3_tiny": (OFAMobileNetV3, _ofa_mbv3.TINY, lambda m: m.search_space()),
    "compofa_mbv3": (OFAMobileNetV3, {}, lambda m: m.compofa_space()),
    "compofa_mbv3_tiny": (OFAMobileNetV3, _ofa_mbv3.TINY, lambda m: m.compofa_space()),
    "ofa_resnet50": (OFAResNet50, {}, lambda m: m.search_space()),
    "ofa_resnet50_tiny": (OFAResNet50, _ofa_resnet50.TINY, lambda m: m.search_space()),
    "slim_mobilenet_v2": (SlimMobileNetV2, {}, lambda m: m.search_space()),
    "slim_mobilenet_v2_tiny": (SlimMobileNetV2, _slim.TINY, lambda m: m.search_space()),
    "elastic_vit": (ElasticViT, {}, lambda m: m.search_space()),
    "elastic_vit_mnist": (ElasticViT, _elastic_vit.MNIST, lambda m: m.search_space()),
    "elastic_vit_tiny": (ElasticViT, _elastic_vit.TINY, lambda m: m.search_space()),
    "elastic_bert": (ElasticBERT, {}, lambda m: m.search_space()),
    "elastic_bert_tiny": (ElasticBERT, _elastic_bert.TINY, lambda m: m.search_space()),
}


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str, **overrides) -> tuple[Supernet, SearchSpace]:
  """Builds a supernet and its search space: ``get("ofa_mbv3", width_mult=1.2)``."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    raise ValueError(f"unknown model {name!r}; known models are {names()}"
                     + (f" (did you mean {close}?)" if close else ""))
  cls, defaults, make_space = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"{name}: unknown options {unknown}; options are {sorted(fields)}")
  model = cls(**{**defaults, **overrides})
  return model, make_space(model)


def with_execution(model: Supernet, execution: str) -> Supernet:
  """``model`` run as ``execution``: "masked", "active", or "auto" (active-size execution where
  the model has it, masked otherwise). See ``ofajax.models.base.EXECUTIONS``."""
  if execution == "auto":
    execution = "active" if "active" in model.executions else "masked"
  check_execution(execution, model.executions)
  return model.clone(execution=execution)


# XLA CPU spends most of a supernet's init compile on ~100 separate random-number generators
# (measured: 28 s -> 9 s for ofa_mbv3_tiny on 2 cores with these options). Init runs once, so
# its own speed does not matter; use these options for one-off functions such as init and
# per-subnet dense checks, never for the training step.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def takes_tokens(model) -> bool:
  """Whether ``model`` reads int token ids [B, T] (text) rather than NHWC images."""
  return model.input_spec.kind == "tokens"


def input_spec(model, resolution: int, batch=1) -> jax.ShapeDtypeStruct:
  """Shape and dtype of ``batch`` inputs at ``resolution`` (image side, or sequence length)."""
  return model.input_spec.struct(resolution, batch)


def sample_input(model, resolution: int, batch: int = 1) -> jax.Array:
  """A dummy input for ``init`` / ``eval_shape`` (ones: a real token, not padding)."""
  return model.input_spec.sample(resolution, batch)


def init(model, key: jax.Array, x: jax.Array, arch=None) -> dict:
  """``model.init`` at the largest arch (or ``arch``), compiled with :data:`FAST_COMPILE`."""
  arch = model.search_space().largest() if arch is None else arch
  compiled = jax.jit(model.init).lower(key, x, arch).compile(compiler_options=FAST_COMPILE)
  variables = compiled(key, x, arch)
  # Models without BatchNorm (transformers) get an empty collection, so that training, BN
  # calibration and checkpoints treat every model alike.
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


__all__ = ["get", "init", "input_spec", "sample_input", "takes_tokens", "with_execution",
           "FAST_COMPILE", "names",
           "InputSpec", "Supernet", "ElasticBERT", "ElasticViT", "MobileNet", "OFAMobileNetV3", "OFAResNet50",
           "ResNet", "SlimMobileNetV2", "SearchSpace"]
