"""Benchmarks: each prints figures next to a peer or physical limit measured in the same run."""
