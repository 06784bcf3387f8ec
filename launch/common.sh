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
