"""Subnet search on a trained supernet: greedy (AutoSlim) and evolutionary (OFA) search with
their moves, Pareto fronts, an accuracy predictor, a whole-net latency model (and OFA's
per-segment latency table) and the search job
(:mod:`ofajax.search.run`). Archs are scored by :mod:`ofajax.evaluation` and supernets read by
:mod:`ofajax.workdir`; random archs and repairs after an edit belong to the space."""
