"""Benchmarks behind ``megapt bench`` (``megapt.bench.cli``); they ship with the package.

    cli          the verb: train | sweep | compare | data | loader | kernels | planner
    runners      one training point: DeepSpeed engine, plain PyTorch and HF Llama baselines, timed
    sweep        the points of a spec/axes, each in a fresh subprocess (worker) with a timeout
    worker       ``python -m megapt.bench.worker SPEC OUT``: one point
    report       benchmark JSON, terminal table, PNG plots, compare
    fingerprint  hardware/software identity and the measured matmul peak
    planner      the memory planner's prediction for a point, and the planner against a real engine
    data, loader tokenize + shard throughput; loader throughput per rank
    kernels/     each fused kernel against its baselines (GPU)

FLOPs per token, MFU and HFU are ``megapt.model.gpt.ModelArgs``'s; peaks come from
``megapt.hardware``.
"""
