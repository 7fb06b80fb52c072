"""Benchmarks: each prints its figures and writes JSON + markdown to benchmarks/results/."""
