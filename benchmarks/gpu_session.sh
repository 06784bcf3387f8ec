#!/usr/bin/env bash
# Every GPU measurement the kernel and benchmark goals need, in three calls of under 10 minutes
# each on one H100/H200 (a lent machine may be fresh at each call, so each phase installs first);
# `core` is the one call to make when the session's device time is 15 minutes in all.
#
#   bash ../shared/gpu/fetch-wheels.sh            # once, on the CPU machine: fills .whl/
#   bash benchmarks/gpu_session.sh core [DIR]     # kernel GPU tests + quick kernel benchmarks + the 124m goal point, ~8 min
#   bash benchmarks/gpu_session.sh kernels [DIR]  # GPU tests (bf16, full shapes) + kernel benchmarks, ~8 min
#   bash benchmarks/gpu_session.sh goals [DIR]    # benchmarks/specs/gpu_goals.yaml: 124m / 1b ZeRO-3 vs plain vs HF, ~9 min
#   bash benchmarks/gpu_session.sh zero [DIR]     # gpu_zero.yaml (ZeRO 1-3 + an OOM point) + planner peak check, ~8 min
#   bash benchmarks/gpu_session.sh all [DIR]      # the three in a row (a machine you hold longer)
#
# DIR defaults to $OUT (the device tool's folder that comes back) or benchmarks/results/gpu-<UTC time>.
# Each phase writes <phase>.log, its JSON (with the hardware fingerprint) and PNGs there, plus
# nvidia-smi.txt. A step that runs past its time limit is killed and the phase goes on; the log
# says which. MEGAPT_GPU_SESSION_DRY=1 prints the commands instead of running them.
set -uo pipefail

phase=${1:-}
case "$phase" in core | kernels | goals | zero | all) ;; *)
  echo "usage: bash benchmarks/gpu_session.sh core|kernels|goals|zero|all [DIR]" >&2
  exit 2
  ;;
esac
cd "$(dirname "$0")/.."
out=${2:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
dry=${MEGAPT_GPU_SESSION_DRY:-0}
py=${PYTHON:-python3}

run() { # run LIMIT_S LABEL CMD...: one step under a time limit, logged
  local limit=$1 label=$2
  shift 2
  echo "=== [$label] $(date -u +%H:%M:%S) limit ${limit}s: $*"
  if [ "$dry" = 1 ]; then return 0; fi
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "=== [$label] ran past ${limit}s and was killed"; fi
  echo "=== [$label] exit $rc at $(date -u +%H:%M:%S)"
  return 0
}

setup() {
  if [ "$dry" = 1 ]; then
    echo "=== [setup] install .whl/ into /tmp/site, pip install -e . --no-deps"
    return 0
  fi
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "=== [setup] no .whl/ here: deepspeed/webdataset/liger must already be installed (bash ../shared/gpu/fetch-wheels.sh)"
  fi
  # editable install: kernels/ is importable as megapt.kernels only through the package mapping
  "$py" -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -3
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
  "$py" - <<'EOF'
import importlib
for m in ("torch", "triton", "deepspeed", "transformers", "liger_kernel", "webdataset", "megapt"):
    try:
        mod = importlib.import_module(m)
        print(f"=== [setup] {m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report and go on: the phase says which step then fails
        print(f"=== [setup] {m} missing: {type(e).__name__}: {e}")
import torch
print("=== [setup] cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
}

phase_core() {
  # no CUDA-extension build (about a minute) and no torch.compile'd FlexAttention here: the kernels phase has them
  run 120 gpu-tests "$py" -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_kernels_gpu.py -k "not cuda" \
    --junitxml "$out/gpu-tests.xml"
  run 130 kernel-bench "$py" -m megapt bench kernels --out "$out/kernels-quick.json" --script-args \
    "--quick --providers megapt,sdpa-flash,sdpa-cudnn,torch-eager,liger,megapt-inplace,megapt-chunked,torch-full-logits"
  run 220 goal-124m "$py" -m megapt bench sweep --spec benchmarks/specs/gpu_124m.yaml --out "$out/goal-124m.json" --logs "$out/goal-124m-logs"
}

phase_kernels() {
  run 170 gpu-tests "$py" -m pytest -q -p no:cacheprovider tests/gpu --junitxml "$out/gpu-tests.xml"
  run 400 kernel-bench "$py" -m megapt bench kernels --out "$out/kernels.json"
}

phase_goals() {
  run 560 goals "$py" -m megapt bench sweep --spec benchmarks/specs/gpu_goals.yaml --out "$out/goals.json" --logs "$out/goals-logs"
}

phase_zero() {
  run 330 zero "$py" -m megapt bench sweep --spec benchmarks/specs/gpu_zero.yaml --out "$out/zero.json" --logs "$out/zero-logs"
  run 220 planner-peak "$py" -m megapt bench planner --nproc 1 --script-args "--mode peak" \
    --out "$out/planner_peak.json"
}

mkdir -p "$out"
{
  echo "=== megapt gpu_session $phase -> $out ($(git rev-parse --short HEAD 2>/dev/null || echo no-git))"
  setup
  case "$phase" in
  core) phase_core ;;
  kernels) phase_kernels ;;
  goals) phase_goals ;;
  zero) phase_zero ;;
  all) phase_kernels && phase_goals && phase_zero ;;
  esac
  echo "=== done $(date -u +%H:%M:%S); files:"
  [ "$dry" = 1 ] || ls -la "$out"
} 2>&1 | tee -a "$out/$phase.log"
