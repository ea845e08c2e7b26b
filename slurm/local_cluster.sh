#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` (and for trying the
# sbatch scripts here before a real cluster): Debian's slurm-wlm and munge, controller and node
# daemon on this host, run as root.
#   bash slurm/local_cluster.sh start    # install if missing, configure, start, wait until usable
#   bash slurm/local_cluster.sh status   # sinfo; non-zero unless the node can take jobs
#   bash slurm/local_cluster.sh stop     # stop slurmd, slurmctld and munged
# Made for containers: no systemd and no cgroup delegation, so processes are tracked through /proc
# (proctrack/linuxproc) and tasks are not bound (task/none); nothing is accounted (no slurmdbd):
# read job states with scontrol/squeue, not sacct. Needs root.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by align's slurm/local_cluster.sh"
STATE=/var/lib/slurm/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
WAIT_S=${SLURM_START_TIMEOUT:-60}  # seconds `start` waits for the node to take jobs
NODE=$(hostname -s)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

# The pid in a daemon's pid file when that process is alive and is that daemon (a stale file after
# a container restart may name an unrelated process); nothing otherwise.
running_pid() {
    local file=$1 name=$2 pid
    [[ -r $file ]] || return 0
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] && echo "$pid"
    return 0
}

install_packages() {
    command -v slurmd >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null && return 0
    echo "installing slurm-wlm and munge (apt-get)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
}

write_config() {
    local cpus memory_mb config
    cpus=$(nproc)
    memory_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # RealMemory a little under MemTotal: slurmd drains a node that has less memory than configured.
    memory_mb=$((memory_mb * 95 / 100))
    config="$MARK; delete this file to have it written again
ClusterName=align-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# A container has no systemd and no cgroup delegation: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# CPUs are the consumable (not whole nodes): several small jobs and array tasks run at once.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Requeued jobs run again (preemption tests); a node that was down comes back when slurmd registers.
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
# Trust the node line below over what slurmd detects (a container's view of the hardware varies).
SlurmdParameters=config_overrides
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
    if [[ -e $CONF ]] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
        die "$CONF exists and was not written by this script; it may configure a real cluster. Move it away to use the local one."
    fi
    mkdir -p "$(dirname "$CONF")"
    # Ours and unchanged: left as it is (daemons already running keep their configuration).
    if [[ ! -e $CONF ]] || [[ "$(cat "$CONF")" != "$config" ]]; then
        printf '%s\n' "$config" >"$CONF.tmp"
        mv "$CONF.tmp" "$CONF"
        echo "wrote $CONF (node $NODE, $cpus CPUs, ${memory_mb} MB)"
    fi
}

start_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        mkdir -p "$(dirname "$MUNGE_KEY")"
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY" && chmod 0400 "$MUNGE_KEY"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [[ -n $(running_pid "$MUNGE_PID" munged) ]] && return 0
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    # munged refuses to run as root with a key root owns; as the munge user it needs no --force.
    runuser -u munge -- munged || die "munged did not start; read $MUNGE_LOG"
    munge -n | unmunge >/dev/null || die "munge cannot encode and decode a credential; read $MUNGE_LOG"
}

start_slurm() {
    mkdir -p "$STATE" "$SPOOL" "$LOGS"
    if [[ -z $(running_pid "$CTLD_PID" slurmctld) ]]; then
        slurmctld || die "slurmctld did not start; read $LOGS/slurmctld.log"
    fi
    if [[ -z $(running_pid "$SLURMD_PID" slurmd) ]]; then
        slurmd || die "slurmd did not start; read $LOGS/slurmd.log"
    fi
}

node_state() {
    # Empty while the controller does not answer yet (just started); never fails, for set -e.
    { sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true; } | head -n 1
}

usable() {
    # idle, mixed or allocated: the node takes jobs (a trailing * or ~ marks it unreachable or powered off).
    [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]
}

wait_until_usable() {
    local deadline=$((SECONDS + WAIT_S)) resumed=0 state
    until usable; do
        state=$(node_state)
        # A node drained by an earlier run (a kill that timed out, say) stays drained across restarts.
        if [[ $resumed == 0 && $state =~ ^(drained|draining|down)$ ]]; then
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        if ((SECONDS >= deadline)); then
            sinfo -N -l >&2 || true
            die "node $NODE is not usable after ${WAIT_S} s (state '${state:-no answer}'); read $LOGS/slurmctld.log and $LOGS/slurmd.log"
        fi
        sleep 1
    done
    timeout "$WAIT_S" srun -n1 -t 1 true \
        || die "the node looks idle but 'srun -n1 true' failed; read $LOGS/slurmd.log and $LOGS/slurmctld.log"
}

stop_daemon() {
    local file=$1 name=$2 pid
    pid=$(running_pid "$file" "$name")
    [[ -n $pid ]] || return 0
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    die "$name (pid $pid) did not stop within 10 s"
}

case ${1:-} in
    start)
        [[ $(id -u) == 0 ]] || die "run as root: the daemons and their folders belong to root"
        install_packages
        write_config
        start_munge
        start_slurm
        wait_until_usable
        sinfo
        ;;
    stop)
        stop_daemon "$SLURMD_PID" slurmd
        stop_daemon "$CTLD_PID" slurmctld
        stop_daemon "$MUNGE_PID" munged
        ;;
    status)
        command -v sinfo >/dev/null || die "sinfo not found; start the cluster with 'bash slurm/local_cluster.sh start'"
        sinfo || die "the controller does not answer; start it with 'bash slurm/local_cluster.sh start'"
        usable || die "node $NODE is not usable (state '$(node_state)'); read $LOGS/slurmd.log"
        ;;
    *)
        die "usage: bash slurm/local_cluster.sh start|stop|status"
        ;;
esac
