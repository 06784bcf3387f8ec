#!/usr/bin/env bash
# Launch with `accelerate launch` (used only as a process launcher: megapt builds its own DeepSpeed
# engine from the config, so no accelerate DeepSpeed plugin/config is involved). Run on every node.
#
#   launch/accelerate_launch.sh --num-machines 2 --machine-rank 0 --main-process-ip node-001 -- -c configs/13b-4node-zero3.yaml
#   launch/accelerate_launch.sh -- -c configs/1b.yaml          # one node, all GPUs
#
# Options (before `--`; everything after `--` goes to `megapt train`):
#   --num-machines N  --machine-rank K  --main-process-ip ADDR  --main-process-port PORT (29500)
#   --gpus-per-machine G (default: GPUs on this machine)   --dry-run
# Pre-flight: `megapt plan` for N x G (exit 3 when it refuses).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

MACHINES=1 RANK=0 MAIN_IP=127.0.0.1 MAIN_PORT=29500 PER=${GPUS:-} DRY_RUN=0
while (( $# )); do
    case $1 in
        --num-machines) MACHINES=$2; shift 2 ;;
        --machine-rank) RANK=$2; shift 2 ;;
        --main-process-ip) MAIN_IP=$2; shift 2 ;;
        --main-process-port) MAIN_PORT=$2; shift 2 ;;
        --gpus-per-machine) PER=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
(( $# )) || die "no megapt arguments; usage: $0 [--num-machines N --machine-rank K --main-process-ip A] -- -c CONFIG.yaml"
PER=${PER:-$(local_gpu_count)}
(( PER > 0 )) || die "no GPUs found: pass --gpus-per-machine N"
getent ahosts "$MAIN_IP" >/dev/null 2>&1 || die "main process host '$MAIN_IP' does not resolve"

run_preflight_plan "$MACHINES" "$PER" "$@"

CMD=(accelerate launch --multi_gpu --num_machines "$MACHINES" --machine_rank "$RANK"
     --num_processes "$(( MACHINES * PER ))" --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT"
     --mixed_precision no --dynamo_backend no -m megapt train "$@")
log "${CMD[*]}"
(( DRY_RUN )) && exit 0
exec "${CMD[@]}"
