"""Benchmarks: `python -m scripts.bench.<name>`; each prints a table and writes JSON + markdown under docs/."""
