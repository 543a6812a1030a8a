"""Benchmarks (not tests): each prints ratios against a baseline measured in the same run.
Entry points are the ``run/bench-*.sh`` scripts."""
