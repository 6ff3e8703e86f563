"""Benchmarks behind `mobilevlm-bench` (tools/bench.py): one module per sub-benchmark, each with main(argv)."""
