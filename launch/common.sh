# shellcheck shell=bash
# Shared helpers for the launch scripts (sourced, not run). Every script ends in `python -m megapt`;
# all training knobs come from the config file (+ --section.key=value overrides).
#
# Environment knobs understood by every script:
#   PYTHON              interpreter that has megapt installed (default: python)
#   MEGAPT_SKIP_PLAN=1  skip the `megapt plan` pre-flight (memory + world-size/batch checks)
#   MEGAPT_PLAN_ARGS    extra args for the pre-flight, e.g. "--gpu a100 --check-only"
#   MEGAPT_SKIP_HOSTCHECK=1  skip the hostfile reachability pre-flight

# Exit code `megapt train` uses after a pre-emption checkpoint (EX_TEMPFAIL, megapt/train/preempt.py).
# The Slurm scripts do not requeue on it (srun's exit code depends on which rank ends first) but on
# the marker file megapt writes after a complete pre-emption save: $MEGAPT_PREEMPT_MARKER.
export MEGAPT_PREEMPT_EXIT=75
# Exit code of these scripts when a pre-flight check fails (nothing was launched).
MEGAPT_PREFLIGHT_EXIT=3

PYTHON=${PYTHON:-python}

die() {
    echo "launch: error: $*" >&2
    exit "$MEGAPT_PREFLIGHT_EXIT"
}

log() {
    echo "launch: $*" >&2
}

# hostfile_hosts FILE -> one "host slots" pair per line (comments and blank lines dropped)
hostfile_hosts() {
    local file=$1
    [[ -f $file ]] || die "hostfile $file not found"
    awk '
        { sub(/#.*/, "") }
        NF == 0 { next }
        {
            slots = 1
            for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, kv, "="); slots = kv[2] }
            print $1, slots
        }' "$file"
}

# check_hostfile FILE MODE: every host resolves and (MODE=ssh) answers passwordless ssh.
# Fails before anything is launched, naming each bad host.
check_hostfile() {
    local file=$1 mode=${2:-ssh} host slots bad=0 first_slots=""
    [[ ${MEGAPT_SKIP_HOSTCHECK:-0} == 1 ]] && return 0
    while read -r host slots; do
        if ! [[ $slots =~ ^[0-9]+$ ]] || (( slots < 1 )); then
            log "hostfile $file: host '$host' has slots=$slots; expected a positive integer"
            bad=1
            continue
        fi
        if [[ -z $first_slots ]]; then
            first_slots=$slots
        elif [[ $slots != "$first_slots" ]]; then
            log "hostfile $file: host '$host' has slots=$slots but the first host has $first_slots; use the same GPU count on every node"
            bad=1
        fi
        if ! getent ahosts "$host" >/dev/null 2>&1; then
            log "hostfile $file: host '$host' does not resolve (getent ahosts $host); fix the name or /etc/hosts/DNS"
            bad=1
            continue
        fi
        if [[ $mode == ssh ]] && ! is_local_host "$host"; then
            if ! timeout 15 ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=accept-new \
                    "$host" true >/dev/null 2>&1; then
                log "hostfile $file: host '$host' is not reachable over passwordless ssh (ssh -o BatchMode=yes $host true failed); set up keys or remove it"
                bad=1
            fi
        fi
    done < <(hostfile_hosts "$file")
    (( bad == 0 )) || die "hostfile pre-flight failed for $file (nothing was launched)"
}

is_local_host() {
    local h=$1
    [[ $h == localhost || $h == 127.* || $h == "$(hostname)" || $h == "$(hostname -s 2>/dev/null)" ]]
}

# preflight_plan NODES GPUS_PER_NODE CONFIG_ARGS...: `megapt plan` for the real world size.
# Exit 2 (bad combination, e.g. a world size that does not divide plan.global_batch) or 1 (does
# not fit) stops the launch.
preflight_plan() {
    local nodes=$1 gpus=$2 rc
    shift 2
    [[ ${MEGAPT_SKIP_PLAN:-0} == 1 ]] && return 0
    # shellcheck disable=SC2086  # MEGAPT_PLAN_ARGS is a list of words on purpose
    "$PYTHON" -m megapt plan "$@" --nodes "$nodes" --gpus-per-node "$gpus" ${MEGAPT_PLAN_ARGS:-} >&2
    rc=$?
    (( rc == 0 )) || die "megapt plan refused this launch (exit $rc) for $nodes node(s) x $gpus GPU(s); fix the config or set MEGAPT_SKIP_PLAN=1"
}

# split_config_args "$@": sets CONFIG_ARGS (everything for megapt: -c FILE, --section.key=value,
# --resume ...) after the script's own options were consumed by the caller.

# plan_args ARGS...: the subset of megapt train arguments `megapt plan` understands
# (-c/--config FILE and --section.key=value overrides), printed NUL-separated.
plan_args() {
    while (( $# )); do
        case $1 in
            -c|--config) printf '%s\0%s\0' "$1" "$2"; shift 2 ;;
            --config=*|-c=*) printf '%s\0' "$1"; shift ;;
            --*.*=*) printf '%s\0' "$1"; shift ;;
            *) shift ;;
        esac
    done
}

# run_preflight_plan NODES GPUS MEGAPT_ARGS...
run_preflight_plan() {
    local nodes=$1 gpus=$2
    shift 2
    local -a pargs=()
    while IFS= read -r -d '' a; do pargs+=("$a"); done < <(plan_args "$@")
    preflight_plan "$nodes" "$gpus" "${pargs[@]}"
}

# local_gpu_count: GPUs on this machine (nvidia-smi), 0 when there are none
local_gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# gres_gpu_count GRES: GPUs in a Slurm Gres string, e.g. "gpu:8" -> 8,
# "gpu:h100:4(S:0-1),nic:1" -> 4, "(null)" or "" -> 0
gres_gpu_count() {
    local gres item n total=0
    # shellcheck disable=SC2001  # drop every "(S:0-1)"-style socket list, not one pattern
    gres=$(sed 's/([^)]*)//g' <<<"${1:-}")
    local IFS=,
    for item in $gres; do
        [[ $item == gpu || $item == gpu:* ]] || continue
        n=${item##*:}
        [[ $n =~ ^[0-9]+$ ]] || n=1
        total=$(( total + n ))
    done
    echo "$total"
}

# slurm_node_gpus: GPUs the cluster configures on this job's node (Gres= of `scontrol show node`);
# 0 outside a Slurm job
slurm_node_gpus() {
    [[ -n ${SLURM_JOB_ID:-} ]] || { echo 0; return; }
    local node=${SLURMD_NODENAME:-$(hostname -s)}
    local gres
    gres=$(timeout 60 scontrol show node -o "$node" 2>/dev/null | grep -o 'Gres=[^ ]*')
    gres_gpu_count "${gres#Gres=}"
}

# config_value KEY MEGAPT_ARGS...: one value of the resolved config (`megapt config`), e.g.
# config_value plan.gpus_per_node -c configs/tiny.yaml --plan.gpus_per_node=2 -> 2
config_value() {
    local key=$1 out
    shift
    local -a cargs=()
    while IFS= read -r -d '' a; do cargs+=("$a"); done < <(plan_args "$@")
    out=$("$PYTHON" -m megapt config "${cargs[@]}") \
        || die "megapt config ${cargs[*]} failed (see above)"
    awk -v sec="${key%%.*}" -v k="${key#*.}" '
        /^[^ ]/ { insec = ($0 == sec ":") ; next }
        insec && $1 == k ":" { print $2; exit }' <<<"$out"
}

# ranks_per_node MEGAPT_ARGS...: sets PER_NODE (ranks to start on every node, one per GPU),
# PER_NODE_FROM (where the number came from) and GPU_ARGS (srun options giving each step its GPUs).
# First match wins: $MEGAPT_GPUS_PER_NODE; the job's own GPU request (sbatch --gpus-per-node);
# the GPUs Slurm configures on the node (Gres=gpu:N; the scripts take whole nodes with
# --exclusive, and a step gets an exclusive job's GPUs only when it asks); on a node without
# GPUs the config's plan.gpus_per_node (CPU ranks, e.g. a CPU-only test partition).
ranks_per_node() {
    local n
    GPU_ARGS=()
    if [[ -n ${MEGAPT_GPUS_PER_NODE:-} ]]; then
        PER_NODE=$MEGAPT_GPUS_PER_NODE PER_NODE_FROM="MEGAPT_GPUS_PER_NODE"
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        PER_NODE=${SLURM_GPUS_PER_NODE##*:} PER_NODE_FROM="sbatch --gpus-per-node"
        GPU_ARGS=(--gpus-per-node="$PER_NODE")
    else
        n=$(slurm_node_gpus)
        if (( n > 0 )); then
            PER_NODE=$n PER_NODE_FROM="Gres of node ${SLURMD_NODENAME:-$(hostname -s)}"
            GPU_ARGS=(--gpus-per-node="$n")
        else
            PER_NODE=$(config_value plan.gpus_per_node "$@")
            PER_NODE_FROM="no GPU on node ${SLURMD_NODENAME:-$(hostname -s)}:"
            PER_NODE_FROM+=" the config's plan.gpus_per_node"
        fi
    fi
    if ! [[ $PER_NODE =~ ^[0-9]+$ ]] || (( PER_NODE < 1 )); then
        die "ranks per node '$PER_NODE' (from $PER_NODE_FROM) is not a positive integer"
    fi
    if (( ${#GPU_ARGS[@]} == 0 )) && (( PER_NODE > ${SLURM_CPUS_ON_NODE:-PER_NODE} )); then
        die "$PER_NODE CPU ranks per node (from $PER_NODE_FROM) but the node has" \
            "$SLURM_CPUS_ON_NODE CPUs; set --plan.gpus_per_node=N or MEGAPT_GPUS_PER_NODE=N"
    fi
}
