"""Benchmark harness and cases (run from a source checkout: ``python -m benchmarks.run``)."""
