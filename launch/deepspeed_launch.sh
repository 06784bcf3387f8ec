#!/usr/bin/env bash
# Multi-node (or single-node) launch with the DeepSpeed launcher; every rank runs `python -m megapt train`.
#
#   # from the first node, reaching the others over passwordless ssh (pdsh):
#   launch/deepspeed_launch.sh -H launch/hostfile -- -c configs/7b-4node-zero2.yaml --resume
#   # or once per node without ssh (e.g. from a scheduler), same hostfile everywhere:
#   launch/deepspeed_launch.sh -H hostfile --node-rank 1 --master-addr node-001 -- -c configs/7b-4node-zero2.yaml
#   # one node, all its GPUs:
#   launch/deepspeed_launch.sh -- -c configs/1b.yaml
#
# Options (before `--`; everything after `--` goes to `megapt train`):
#   -H, --hostfile FILE   DeepSpeed hostfile (`host slots=N` lines; see launch/hostfile.example)
#   --node-rank K         launch only this node's ranks, no ssh (deepspeed --no_ssh --node_rank K)
#   --master-addr ADDR    rendezvous host (default: $MASTER_ADDR or the first hostfile host)
#   --master-port PORT    rendezvous port (default: $MASTER_PORT or 29500)
#   --gpus N              GPUs per node without a hostfile (default: all)
#   --dry-run             run the pre-flight checks, print the command, launch nothing
# Environment forwarded to the other nodes (ssh mode) through a temporary DeepSpeed env file
# (removed at exit; your own .deepspeed_env / $DS_ENV_FILE lines are included): see FORWARD.
# Pre-flight (before anything starts): every hostfile host resolves and answers ssh; `megapt plan`
# accepts the world size (plan.global_batch divisible, memory fits). Exit 3 when a check fails.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
source "$HERE/common.sh"

HOSTFILE="" NODE_RANK="" GPUS="" DRY_RUN=0
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
while (( $# )); do
    case $1 in
        -H|--hostfile) HOSTFILE=$2; shift 2 ;;
        --node-rank) NODE_RANK=$2; shift 2 ;;
        --master-addr) MASTER_ADDR=$2; shift 2 ;;
        --master-port) MASTER_PORT=$2; shift 2 ;;
        --gpus) GPUS=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
(( $# )) || die "no megapt arguments; usage: $0 [-H hostfile] [--node-rank K] -- -c CONFIG.yaml [--section.key=value ...]"

declare -a DS_ARGS=(--master_port "$MASTER_PORT" --no_local_rank)
if [[ -n $HOSTFILE ]]; then
    mapfile -t HOSTS < <(hostfile_hosts "$HOSTFILE")
    (( ${#HOSTS[@]} )) || die "hostfile $HOSTFILE lists no hosts"
    NODES=${#HOSTS[@]}
    read -r FIRST_HOST PER_NODE <<<"${HOSTS[0]}"
    MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
    if (( NODES == 1 )) && [[ -z $NODE_RANK ]]; then
        NODE_RANK=0  # one node: nothing to reach over ssh
    fi
    if [[ -n $NODE_RANK ]]; then
        (( NODE_RANK >= 0 && NODE_RANK < NODES )) || die "--node-rank $NODE_RANK: hostfile $HOSTFILE has $NODES node(s)"
        check_hostfile "$HOSTFILE" resolve
        DS_ARGS+=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
    else
        check_hostfile "$HOSTFILE" ssh
        DS_ARGS+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
        # forwarded to every node: DeepSpeed reads $DS_ENV_FILE (default ./.deepspeed_env) and
        # exports each VAR=value line on the remote command line
        FORWARD='^(PATH|PYTHONPATH|VIRTUAL_ENV|LD_LIBRARY_PATH|CUDA_HOME|DS_ACCELERATOR|OMP_NUM_THREADS|HF_HOME|NCCL_[A-Z_]*|GLOO_[A-Z_]*|TORCH_[A-Z_]*|MEGAPT_[A-Z_]*)='
        # (a private temporary file, removed when this script ends, --dry-run included; the lines of
        # the user's own .deepspeed_env, which DeepSpeed would otherwise read, come first)
        USER_ENV_FILE=${DS_ENV_FILE:-.deepspeed_env}
        DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/megapt-deepspeed_env.XXXXXX") \
            || die "cannot create a temporary file in ${TMPDIR:-/tmp}"
        export DS_ENV_FILE
        trap 'rm -f "$DS_ENV_FILE"' EXIT
        for f in "$HOME/$USER_ENV_FILE" "$USER_ENV_FILE"; do
            [[ -f $f ]] && grep '=' "$f" >> "$DS_ENV_FILE"
        done
        env | grep -E "$FORWARD" | grep -v '^MEGAPT_SKIP' >> "$DS_ENV_FILE" || true
        log "forwarding $(wc -l < "$DS_ENV_FILE") variables to the other nodes via $DS_ENV_FILE"
    fi
else
    NODES=1
    PER_NODE=${GPUS:-$(local_gpu_count)}
    (( PER_NODE > 0 )) || die "no GPUs found and no --gpus/--hostfile given (for CPU runs use a hostfile with slots=N)"
    DS_ARGS+=(--num_gpus "$PER_NODE")
    [[ -n $MASTER_ADDR ]] && DS_ARGS+=(--master_addr "$MASTER_ADDR")
fi

run_preflight_plan "$NODES" "$PER_NODE" "$@"

CMD=(deepspeed "${DS_ARGS[@]}" --module megapt train "$@")
log "${NODES} node(s) x ${PER_NODE} rank(s), master ${MASTER_ADDR:-auto}:${MASTER_PORT}"
log "${CMD[*]}"
(( DRY_RUN )) && exit 0
[[ -n ${USER_ENV_FILE:-} ]] || exec "${CMD[@]}"
# ssh mode: stay the parent so the EXIT trap removes the forwarded-environment file; pass on the
# signals DeepSpeed's runner handles (it then stops the remote ranks through pdsh)
"${CMD[@]}" &
DS_PID=$!
trap 'kill -INT "$DS_PID" 2>/dev/null' INT
trap 'kill -TERM "$DS_PID" 2>/dev/null' TERM
while :; do
    wait "$DS_PID"
    rc=$?
    kill -0 "$DS_PID" 2>/dev/null || break
done
exit "$rc"
