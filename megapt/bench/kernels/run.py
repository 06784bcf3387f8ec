"""Kernel benchmarks, one entry point: attention, RMSNorm, RoPE, linear+CE vs their baselines.

    megapt bench kernels                                      # everything (~10-20 min on one H100)
    megapt bench kernels --script-args "--quick"              # a few shapes per op (~2 min)
    megapt bench kernels --script-args "--only attention --gqa 4"
    megapt bench kernels --script-args "--dry-run"            # no GPU needed: cases + fingerprint
    python -m megapt.bench.kernels --quick                    # the same, directly

Writes one JSON (default benchmarks/results/kernels-<UTC time>-<host>.json under the current
folder): the hardware
fingerprint, the arguments, every measured row (provider, shape, ms, TFLOP/s or GB/s, status)
and per case megapt's speedup over each baseline measured in the same run; PNG plots beside it
when matplotlib is installed. Baselines that are not installed (liger-kernel, flash-attn) are
recorded as "unavailable", failures as "error: ..."; neither stops the run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megapt.bench.kernels import attention, cross_entropy, rms_norm, rope
from megapt.bench.kernels.common import default_out, fingerprint, require_cuda, write_json

BENCHES = {
    "attention": attention,
    "rms_norm": rms_norm,
    "rope": rope,
    "cross_entropy": cross_entropy,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHES),
        help="run only these benchmarks (repeatable; default: all)",
    )
    p.add_argument("--quick", action="store_true", help="few shapes, short timing loops")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/kernels-*.json)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cases and write the fingerprint; run nothing",
    )
    p.add_argument(
        "--providers",
        default=None,
        help="comma-separated subset of providers (default: all, e.g. megapt,sdpa-flash)",
    )
    attention.add_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.only or list(BENCHES)
    plan = {
        name: BENCHES[name].cases(quick=args.quick, gqa=args.gqa, dtype=args.dtype)
        for name in names
    }
    out = args.out or default_out()
    doc = {
        "kind": "kernels",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": {
            "only": names,
            "quick": args.quick,
            "gqa": args.gqa,
            "dtype": args.dtype,
            "providers": {n: list(BENCHES[n].PROVIDERS) for n in names},
        },
        "fingerprint": fingerprint(),
        "metrics": {
            "attention": "TFLOP/s, fwd 4*B*nh*T^2*hs (x0.5 causal), fwd+bwd 3.5x fwd",
            "rms_norm": "GB/s of x/y (fwd) + dy/x/dx (bwd)",
            "rope": "GB/s of q,k read+write",
            "cross_entropy": "TFLOP/s of the three GEMMs 6*N*C*V, plus peak MiB",
            "speedup_vs": "baseline ms / megapt ms for the same case (> 1: megapt faster)",
        },
        "results": {},
        "plots": [],
    }
    if args.dry_run:
        doc["dry_run"] = True
        doc["planned_cases"] = plan
        write_json(out, doc)
        print(f"dry run: {sum(len(v) for v in plan.values())} cases planned; wrote {out}")
        return 0
    require_cuda("megapt bench kernels")
    for name in names:
        bench = BENCHES[name]
        providers = bench.PROVIDERS
        if args.providers:
            wanted = set(args.providers.split(","))
            providers = tuple(p for p in providers if p in wanted)
        doc["results"][name] = bench.run(plan[name], quick=args.quick, providers=providers)
        write_json(out, doc)  # partial results survive a crash in a later benchmark
    if not args.no_plots:
        for name in names:
            doc["plots"] += BENCHES[name].plot(doc["results"][name], out.parent / out.stem)
        if not doc["plots"]:
            doc["plots_note"] = "matplotlib not installed: no PNG plots"
    write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
