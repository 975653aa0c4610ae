#!/usr/bin/env bash
# A single-node Slurm cluster on this machine (slurmctld + slurmd + munged on localhost), for trying and testing
# the workflow's cluster profile without a cluster:
#
#   bash scripts/slurm-local.sh up      # install slurm-wlm + munge (Debian) if missing, start, submit a test job
#   export SLURM_CONF=/tmp/specdec-slurm/slurm.conf     # (printed by `up`) then sbatch/squeue/snakemake use it
#   bash scripts/slurm-local.sh down    # stop the daemons this script started
#
# Everything lives in $SPECDEC_SLURM_DIR (default /tmp/specdec-slurm): its own munge key and socket, ports,
# state and logs, so it neither needs nor disturbs a system-wide munge. The one file outside it is a link
# /etc/slurm/slurm.conf -> $DIR/slurm.conf, made only where no such file exists (see link_default_config).
# The node offers the machine's CPUs and memory plus $SPECDEC_SLURM_FAKE_GPUS (default 2) GPU "gres" of type
# `fake` backed by empty files: Slurm schedules `--gpus=N` requests as on a GPU cluster (and sets
# CUDA_VISIBLE_DEVICES), but there is no GPU behind them, so a GPU cell run here fails cleanly with "asks for N
# GPU(s) but this machine has 0 visible".
#
# Exit codes: 0 = up (or down); 3 = this machine cannot run it (the reason is printed on the last line, starting
# with "UNAVAILABLE:"); anything else = a bug in this script.
set -uo pipefail

DIR=${SPECDEC_SLURM_DIR:-/tmp/specdec-slurm}
FAKE_GPUS=${SPECDEC_SLURM_FAKE_GPUS:-2}
NODE=$(hostname -s)
export SLURM_CONF="$DIR/slurm.conf"

unavailable() {
    echo "UNAVAILABLE: $*" >&2
    exit 3
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || unavailable "slurm-wlm/munge are not installed and there is no apt-get here"
    [ "$(id -u)" = 0 ] || unavailable "slurm-wlm/munge are not installed and installing them needs root"
    echo "slurm-local: installing slurm-wlm and munge with apt-get ..." >&2
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
        >"$DIR/apt.log" 2>&1; then
        unavailable "apt-get install slurm-wlm munge failed: $(tail -n 1 "$DIR/apt.log")"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

running() {  # running NAME: $DIR/NAME.pid names a live process called NAME (not a recycled pid)
    [ -s "$DIR/$1.pid" ] && [ "$(cat "/proc/$(cat "$DIR/$1.pid")/comm" 2>/dev/null)" = "$1" ]
}

write_config() {
    local cpus mem gres=""
    cpus=$(nproc)
    # what slurmd itself detects, less 10% so the node never registers below its configuration
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( ${mem:-2000} * 9 / 10 ))
    if [ "$FAKE_GPUS" -gt 0 ]; then
        gres="Gres=gpu:fake:$FAKE_GPUS"
        {
            echo "AutoDetect=off"
            for i in $(seq 0 $((FAKE_GPUS - 1))); do
                : >"$DIR/fake-gpu$i"
                echo "NodeName=$NODE Name=gpu Type=fake File=$DIR/fake-gpu$i"
            done
        } >"$DIR/gres.conf"
    else
        : >"$DIR/gres.conf"
    fi
    cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster on $NODE.
ClusterName=specdec-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups (containers rarely allow them) and no accounting database: squeue is the job status source.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue for 10 minutes (Snakemake's slurm executor polls it).
MinJobAge=600
GresTypes=gpu
NodeName=$NODE CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

link_default_config() {
    # Snakemake's slurm-jobstep plugin drops every SLURM_* variable (SLURM_CONF too) before it runs `srun` inside
    # a job, so srun must find the configuration at Slurm's default path. Link it there unless another Slurm
    # installation already has a file of its own there.
    local default=/etc/slurm/slurm.conf
    if [ -L "$default" ] && [ "$(readlink "$default")" = "$SLURM_CONF" ]; then
        return 0
    fi
    [ -e "$default" ] && unavailable "$default belongs to another Slurm setup; srun inside Snakemake jobs would use it"
    mkdir -p /etc/slurm && ln -s "$SLURM_CONF" "$default" || unavailable "cannot link $default (needs root)"
}

start_munge() {
    [ -s "$DIR/munge.key" ] || dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge.key"
    running munged && return 0
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munged.seed" 2>>"$DIR/log/munged.log" \
        || unavailable "munged did not start: $(tail -n 1 "$DIR/log/munged.log")"
    munge --socket="$DIR/munge.socket" -n | unmunge --socket="$DIR/munge.socket" >/dev/null 2>&1 \
        || unavailable "munge cannot encode/decode a credential with its own key (see $DIR/log/munged.log)"
}

up() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    install_packages
    if running slurmctld && running slurmd; then
        echo "slurm-local: already running (SLURM_CONF=$SLURM_CONF)" >&2
    else
        down 2>/dev/null
        write_config
        link_default_config
        start_munge
        slurmctld -i >>"$DIR/log/start.log" 2>&1 \
            || unavailable "slurmctld did not start: $(tail -n 1 "$DIR/log/slurmctld.log" 2>/dev/null)"
        slurmd >>"$DIR/log/start.log" 2>&1 \
            || unavailable "slurmd did not start: $(grep error "$DIR/log/slurmd.log" 2>/dev/null | tail -n 1)"
    fi
    local state=""
    for _ in $(seq 1 60); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1)
        case "$state" in idle*|mixed*|allocated*) break ;; esac
        sleep 1
    done
    case "$state" in
        idle*|mixed*|allocated*) ;;
        *) unavailable "the node did not become idle (state '${state:-none}'): $(grep error "$DIR/log/slurmctld.log" \
               "$DIR/log/slurmd.log" 2>/dev/null | tail -n 1)" ;;
    esac
    local out="$DIR/hostname.out"
    rm -f "$out"
    if ! timeout 120 sbatch --wait --quiet -o "$out" --wrap hostname >/dev/null 2>"$DIR/log/sbatch.err" \
        || [ "$(cat "$out" 2>/dev/null)" != "$(hostname)" ]; then
        unavailable "sbatch --wrap hostname did not run: $(tail -n 1 "$DIR/log/sbatch.err") $(cat "$out" 2>/dev/null)"
    fi
    echo "slurm-local: up on $NODE ($(nproc) CPUs, $FAKE_GPUS fake GPUs); sbatch --wrap hostname printed $(cat "$out")" >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

down() {
    local name
    for name in slurmd slurmctld munged; do
        if running "$name"; then
            kill "$(cat "$DIR/$name.pid")"
            for _ in $(seq 1 20); do running "$name" || break; sleep 0.5; done
        fi
        rm -f "$DIR/$name.pid"
    done
    if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$SLURM_CONF" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
}

case "${1:-}" in
    up) up ;;
    down) down; echo "slurm-local: stopped" >&2 ;;
    *) echo "usage: $0 up|down   (state in \$SPECDEC_SLURM_DIR, default /tmp/specdec-slurm)" >&2; exit 2 ;;
esac
