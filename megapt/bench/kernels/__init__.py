"""Kernel benchmarks (``megapt bench kernels``): each op against its baselines in the same run.

common (timing, JSON, plots), attention, rms_norm, rope, cross_entropy (cases + providers + run
+ plot each), run (the entry point: ``python -m megapt.bench.kernels [--quick] [--only OP]``).
"""
