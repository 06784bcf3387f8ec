#!/usr/bin/env bash
# Launch with torchrun (elastic agent, c10d rendezvous); run the same command on every node.
#
#   # node 0 and node 1 (node 0's address as the rendezvous endpoint):
#   launch/torchrun_launch.sh --nnodes 2 --node-rank 0 --rdzv-endpoint node-001:29400 -- -c configs/13b-4node-zero3.yaml
#   launch/torchrun_launch.sh --nnodes 2 --node-rank 1 --rdzv-endpoint node-001:29400 -- -c configs/13b-4node-zero3.yaml
#   # one node, all its GPUs:
#   launch/torchrun_launch.sh -- -c configs/1b.yaml
#
# Options (before `--`; everything after `--` goes to `megapt train`):
#   --nnodes N             nodes (default 1)
#   --node-rank K          this node's rank (default 0)
#   --nproc-per-node G     ranks per node (default: GPUs on this machine)
#   --rdzv-endpoint H:P    rendezvous host:port (default 127.0.0.1:29400 for one node; required for more)
#   --rdzv-id ID           job id shared by all nodes (default: $SLURM_JOB_ID or "megapt")
#   --local-addr ADDR      address other nodes reach this one at (multi-homed hosts, containers)
#   --dry-run              pre-flight checks + print the command only
# The node whose --node-rank is 0 hosts the rendezvous store when the endpoint is one of its addresses.
# Pre-flight: `megapt plan` for nnodes x nproc-per-node (exit 3 when it refuses).
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

NNODES=1 NODE_RANK=0 NPROC="" ENDPOINT="" RDZV_ID=${SLURM_JOB_ID:-megapt} LOCAL_ADDR="" DRY_RUN=0
while (( $# )); do
    case $1 in
        --nnodes) NNODES=$2; shift 2 ;;
        --node-rank) NODE_RANK=$2; shift 2 ;;
        --nproc-per-node) NPROC=$2; shift 2 ;;
        --rdzv-endpoint) ENDPOINT=$2; shift 2 ;;
        --rdzv-id) RDZV_ID=$2; shift 2 ;;
        --local-addr) LOCAL_ADDR=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
(( $# )) || die "no megapt arguments; usage: $0 [--nnodes N --node-rank K --rdzv-endpoint H:P] -- -c CONFIG.yaml"
NPROC=${NPROC:-$(local_gpu_count)}
(( NPROC > 0 )) || die "no GPUs found: pass --nproc-per-node N (CPU runs too)"
if [[ -z $ENDPOINT ]]; then
    (( NNODES == 1 )) || die "--rdzv-endpoint HOST:PORT is required with --nnodes $NNODES"
    ENDPOINT=127.0.0.1:29400
fi
RDZV_HOST=${ENDPOINT%:*}
getent ahosts "$RDZV_HOST" >/dev/null 2>&1 || die "rendezvous host '$RDZV_HOST' does not resolve"

declare -a RDZV_CONF=()
if (( NODE_RANK == 0 )); then
    RDZV_IP=$(getent ahosts "$RDZV_HOST" | awk '{print $1; exit}')
    if ip -o addr show 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | grep -qxF "$RDZV_IP"; then
        RDZV_CONF=(--rdzv_conf is_host=1)
    fi
fi

run_preflight_plan "$NNODES" "$NPROC" "$@"

CMD=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC"
     --rdzv_backend c10d --rdzv_endpoint "$ENDPOINT" --rdzv_id "$RDZV_ID" "${RDZV_CONF[@]}")
[[ -n $LOCAL_ADDR ]] && CMD+=(--local_addr "$LOCAL_ADDR")
CMD+=(-m megapt train "$@")
log "node $NODE_RANK of $NNODES x $NPROC rank(s), rendezvous $ENDPOINT (id $RDZV_ID)"
log "${CMD[*]}"
(( DRY_RUN )) && exit 0
exec "${CMD[@]}"
