"""Benchmarks (`python -m pipelines.bench NAME ...`): each prints ratios measured in one run; none is a test."""
