"""Subnet search on a trained supernet: the batched evaluation engine, greedy (AutoSlim) and
evolutionary (OFA) search, an accuracy predictor, latency tables and the search job."""
