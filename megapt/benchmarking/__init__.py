"""Benchmark internals behind `megapt bench` (megapt/bench.py): fingerprint and peaks, runners,
sweeps in subprocesses, JSON/table/plots/compare. Import the public API from megapt.bench."""
