"""ofajax: train an elastic supernet once, serve many subnets (JAX + Flax)."""

from ofajax import cost, elastic, export, layers, models, space
from ofajax.elastic import elasticize
from ofajax.space import Leaf, SearchSpace

__all__ = ["cost", "elastic", "elasticize", "export", "layers", "models", "space", "Leaf",
           "SearchSpace"]
