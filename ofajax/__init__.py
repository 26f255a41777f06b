"""ofajax: train an elastic supernet once, serve many subnets (JAX + Flax)."""

from ofajax import cost, export, layers, models, space
from ofajax.space import Leaf, SearchSpace

__all__ = ["cost", "export", "layers", "models", "space", "Leaf", "SearchSpace"]
