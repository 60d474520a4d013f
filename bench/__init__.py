"""Benchmarks, one module per benchmark: ``python -m bench.tick`` (see bench/README.md)."""
