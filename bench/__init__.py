"""Benchmarks (run with `make bench`); figures are recorded in docs/benchmarks.md, never asserted."""
