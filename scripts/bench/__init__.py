"""Benchmarks: `python -m scripts.bench.<name>`.

Each prints a table and writes JSON + markdown under docs/ (`bench_lib`)."""
