# shellcheck shell=bash
# Body shared by the Slurm batch scripts (sourced after their #SBATCH header has set MODE):
#   MODE=srun       one task per GPU: `srun python -m megapt train`; every rank reads its rank from
#                   SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (megapt/train/dist.py)
#   MODE=deepspeed  one task per node running the DeepSpeed launcher with --no_ssh --node_rank
# Usage of every sbatch file:  sbatch [--nodes N] launch/slurm_*.sbatch CONFIG.yaml [--section.key=value ...]
# Pre-emption: Slurm sends USR1 120 s before the time limit (#SBATCH --signal=USR1@120) and
# SIGTERM on pre-emption; megapt checkpoints at the next step boundary and exits 75 (EX_TEMPFAIL),
# on which this script runs `scontrol requeue`; the requeued job resumes (--resume) from that checkpoint.
# Logs: logs/<job name>-<job id>.out (appended across requeues), one line per restart.
set -uo pipefail

ROOT=${MEGAPT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=SCRIPTDIR/common.sh
source "$ROOT/launch/common.sh"
cd "$ROOT" || die "cannot cd to $ROOT (set MEGAPT_ROOT to the megapt checkout)"

MODE=${MODE:-srun}
(( $# )) || die "usage: sbatch $0 CONFIG.yaml [--section.key=value ...]"
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config $CONFIG not found (relative to $ROOT)"
: "${SLURM_JOB_ID:?not inside a Slurm job (run with sbatch)}"

NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
mapfile -t NODE_NAMES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}")
export MASTER_ADDR=${MASTER_ADDR:-${NODE_NAMES[0]}}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [[ $MODE == srun ]]; then
    PER_NODE=$(( ${SLURM_NTASKS:-$NODES} / NODES ))
else
    PER_NODE=${SLURM_GPUS_ON_NODE:-${MEGAPT_GPUS_PER_NODE:-$(local_gpu_count)}}
fi
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${NODES} node(s) [${NODE_NAMES[*]}] x ${PER_NODE} rank(s); master ${MASTER_ADDR}:${MASTER_PORT}; config $CONFIG $*"

run_preflight_plan "$NODES" "$PER_NODE" -c "$CONFIG" "$@"

if [[ $MODE == srun ]]; then
    srun --kill-on-bad-exit=1 --cpu-bind=none --export=ALL \
        "$PYTHON" -m megapt train -c "$CONFIG" --resume "$@" &
else
    HOSTFILE=${MEGAPT_HOSTFILE_DIR:-$ROOT/logs}/hostfile-$SLURM_JOB_ID
    mkdir -p "$(dirname "$HOSTFILE")"
    for n in "${NODE_NAMES[@]}"; do echo "$n slots=$PER_NODE"; done > "$HOSTFILE"
    # one launcher per node; launchers ignore USR1 (inherited), megapt installs its own handler,
    # so only the training processes react to the time-limit warning
    # shellcheck disable=SC2016  # $SLURM_NODEID expands in each task, not here
    srun --ntasks-per-node=1 --ntasks="$NODES" --kill-on-bad-exit=1 --cpu-bind=none --export=ALL \
        bash -c 'trap "" USR1; export MEGAPT_SKIP_PLAN=1; exec "$0"/launch/deepspeed_launch.sh -H "$1" --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -- "${@:2}"' \
        "$ROOT" "$HOSTFILE" -c "$CONFIG" --resume "$@" &
fi
SRUN_PID=$!
# The batch shell gets SIGTERM/USR1 too: note it and keep waiting for the ranks to checkpoint.
trap 'log "signal received: waiting for megapt to checkpoint and exit $MEGAPT_PREEMPT_EXIT"' TERM USR1
while :; do
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
if (( rc == MEGAPT_PREEMPT_EXIT )); then
    log "megapt was pre-empted (exit $rc) and saved a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed; resubmit: sbatch $0 $CONFIG $*"
    exit 0
fi
log "megapt exited $rc"
exit "$rc"
