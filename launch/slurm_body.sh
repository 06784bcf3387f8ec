# shellcheck shell=bash
# Body shared by the Slurm batch scripts (sourced after their #SBATCH header has set MODE):
#   MODE=srun       one task per GPU: `srun python -m megapt train`; every rank reads its rank from
#                   SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (megapt/train/dist.py)
#   MODE=deepspeed  one task per node running the DeepSpeed launcher with --no_ssh --node_rank
# Usage of every sbatch file:  sbatch [--nodes N] launch/slurm_*.sbatch CONFIG.yaml [--section.key=value ...]
# Submit from the megapt checkout: the job's working directory is the submit directory.
#
# Ranks per node: one per GPU Slurm gives the node (the scripts take whole nodes: --exclusive), or
# on nodes without GPUs the config's plan.gpus_per_node; $MEGAPT_GPUS_PER_NODE overrides both
# (ranks_per_node in launch/common.sh).
#
# Pre-emption: Slurm sends USR1 120 s before the time limit (#SBATCH --signal=USR1@120); an operator
# can send it at any time (`scancel --signal=USR1 JOB`). megapt checkpoints at the next step
# boundary (on USR1 or SIGTERM), writes $MEGAPT_PREEMPT_MARKER once every rank has finished the save, and
# exits 75. This script requeues the job when that marker exists for this run (job id + restart
# count in its name, removed before the step starts), whatever srun returns: srun reports whichever
# rank it sees end first, and with --kill-on-bad-exit it may SIGTERM the others while they exit.
# Not when Slurm itself is ending the job (scancel, the time limit reached, a cancelling
# pre-emption: SIGTERM, JobState no longer RUNNING): the checkpoint is kept, the job ends.
# No marker: the exit code of srun is the job's (a crash fails the job; --kill-on-bad-exit stops
# the other ranks at once). The requeued job resumes (--resume) from that checkpoint.
#
# Files: logs/<job name>-<job id>.out in the submit directory (appended across requeues; the
# logs/ folder ships with the checkout so Slurm can open it), logs/<name>-<id>.r<restart>.preempted
# (the marker, removed when acted on) and, in deepspeed mode, logs/hostfile-<id>.
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

JOB_DIR=${MEGAPT_JOB_DIR:-$ROOT/logs}
mkdir -p "$JOB_DIR" || die "cannot create $JOB_DIR (set MEGAPT_JOB_DIR to a writable shared folder)"
RESTART=${SLURM_RESTART_COUNT:-0}
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
mapfile -t NODE_NAMES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}")
export MASTER_ADDR=${MASTER_ADDR:-${NODE_NAMES[0]}}
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
ranks_per_node -c "$CONFIG" "$@"
CPUS=${SLURM_CPUS_ON_NODE:-1}
if [[ $MODE == srun ]]; then
    CPUS_PER_TASK=$(( CPUS / PER_NODE > 0 ? CPUS / PER_NODE : 1 ))
else
    CPUS_PER_TASK=$CPUS
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
log "job $SLURM_JOB_ID (restart $RESTART) on ${NODES} node(s) [${NODE_NAMES[*]}] x ${PER_NODE}" \
    "rank(s) ($PER_NODE_FROM); master ${MASTER_ADDR}:${MASTER_PORT}; config $CONFIG $*"

run_preflight_plan "$NODES" "$PER_NODE" -c "$CONFIG" "$@"

JOB_NAME=${SLURM_JOB_NAME:-megapt}
JOB_NAME=${JOB_NAME//[^A-Za-z0-9._-]/_}
export MEGAPT_PREEMPT_MARKER=$JOB_DIR/$JOB_NAME-$SLURM_JOB_ID.r$RESTART.preempted
rm -f "$MEGAPT_PREEMPT_MARKER"
if [[ $MODE == srun ]]; then
    srun --nodes="$NODES" --ntasks-per-node="$PER_NODE" --ntasks="$(( NODES * PER_NODE ))" \
        --cpus-per-task="$CPUS_PER_TASK" "${GPU_ARGS[@]}" \
        --kill-on-bad-exit=1 --cpu-bind=none --export=ALL \
        "$PYTHON" -m megapt train -c "$CONFIG" --resume "$@" &
else
    HOSTFILE=$JOB_DIR/hostfile-$SLURM_JOB_ID
    for n in "${NODE_NAMES[@]}"; do echo "$n slots=$PER_NODE"; done > "$HOSTFILE"
    # one launcher per node; launchers ignore USR1 (inherited), megapt installs its own handler,
    # so only the training processes react to the time-limit warning
    # shellcheck disable=SC2016  # $SLURM_NODEID expands in each task, not here
    srun --nodes="$NODES" --ntasks-per-node=1 --ntasks="$NODES" \
        --cpus-per-task="$CPUS_PER_TASK" "${GPU_ARGS[@]}" \
        --kill-on-bad-exit=1 --cpu-bind=none --export=ALL \
        bash -c 'trap "" USR1; export MEGAPT_SKIP_PLAN=1; exec "$0"/launch/deepspeed_launch.sh -H "$1" --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -- "${@:2}"' \
        "$ROOT" "$HOSTFILE" -c "$CONFIG" --resume "$@" &
fi
SRUN_PID=$!
# The batch shell gets SIGTERM/USR1 too: note it and keep waiting for the ranks to checkpoint.
trap 'log "signal received: waiting for megapt to checkpoint"' TERM USR1
while :; do
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [[ -f $MEGAPT_PREEMPT_MARKER ]]; then
    saved=$(cat "$MEGAPT_PREEMPT_MARKER")
    rm -f "$MEGAPT_PREEMPT_MARKER"
    state=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1)
    state=${state#JobState=}
    if [[ -n $state && $state != RUNNING ]]; then
        # scancel, a time limit reached or a pre-emption that cancels: Slurm is ending the job
        # (JobState COMPLETING). Requeueing it here would undo a user's scancel; a partition with
        # PreemptMode=REQUEUE requeues pre-empted jobs itself.
        log "megapt saved a complete checkpoint ($saved), but Slurm is ending job $SLURM_JOB_ID" \
            "(JobState=$state: scancel, time limit or pre-emption): not requeueing;" \
            "sbatch the same command again to resume"
        exit 0
    fi
    log "megapt saved a complete pre-emption checkpoint ($saved); srun exited $rc:" \
        "requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed; resubmit: sbatch $0 $CONFIG $*"
    exit 0
fi
if (( rc == MEGAPT_PREEMPT_EXIT )); then
    log "megapt exited $rc but wrote no pre-emption marker ($MEGAPT_PREEMPT_MARKER): not requeueing"
fi
log "megapt exited $rc"
exit "$rc"
