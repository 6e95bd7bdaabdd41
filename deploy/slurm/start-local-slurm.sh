#!/usr/bin/env bash
# Install (if needed), configure and start a single-node Slurm with munge on this machine.
#
# For the test suite and for trying `daskdiff run --cluster slurm:local-slurm` on one machine.
# Needs root and apt (Debian/Ubuntu); works without systemd. Idempotent: packages already
# installed are not reinstalled, daemons already running with the same configuration are left
# alone (a changed configuration restarts them). Exits 0 once `sinfo` shows the node usable
# (idle, or mixed/allocated when jobs already run); non-zero with the reason otherwise.
#
# Environment:
#   LOCAL_SLURM_CPUS   CPUs the node advertises (default 4: more 1-core worker jobs than cores,
#                      through SlurmdParameters=config_overrides). "hw" uses the hardware count.
#   LOCAL_SLURM_WAIT   seconds to wait for the node (default 60).
#
# Stop with deploy/slurm/stop-local-slurm.sh.
set -euo pipefail

CPUS="${LOCAL_SLURM_CPUS:-4}"
WAIT="${LOCAL_SLURM_WAIT:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
NODE="$(hostname -s)"

say() { echo "start-local-slurm: $*"; }
die() { echo "start-local-slurm: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and starts daemons)"

# --- 1. packages -------------------------------------------------------------------------
need_install=0
for binary in slurmctld slurmd sinfo munged; do
    command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || need_install=1
done
if [ "$need_install" -eq 1 ]; then
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and apt-get is not available"
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    # without an init system the postinst scripts cannot start services: harmless warnings
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge \
        >/dev/null || die "apt-get install failed"
fi

# shellcheck source=deploy/slurm/daemons.sh
source "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"

# --- 2. munge ----------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    say "creating the munge key"
    mungekey --create
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge   # systemd's RuntimeDirectory otherwise
if ! running_pid /run/munge/munged.pid munged >/dev/null; then
    say "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 1 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.1
done
munge -n | unmunge >/dev/null 2>&1 || die "munge does not work (munge -n | unmunge failed)"

# --- 3. slurm.conf -----------------------------------------------------------------------
hardware="$(/usr/sbin/slurmd -C | head -1)"
field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hardware"; }
hw_cpus="$(field CPUs)"
memory="$(field RealMemory)"
memory=$(( memory - memory / 10 ))
[ "$memory" -ge 512 ] || memory=512
overrides=""
if [ "$CPUS" = "hw" ]; then
    node_cpus="CPUs=$hw_cpus Boards=$(field Boards) SocketsPerBoard=$(field SocketsPerBoard)"
    node_cpus="$node_cpus CoresPerSocket=$(field CoresPerSocket)"
    node_cpus="$node_cpus ThreadsPerCore=$(field ThreadsPerCore)"
else
    [[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "LOCAL_SLURM_CPUS must be a positive integer or hw"
    # advertise more CPUs than the hardware has, so that several 1-core worker jobs fit
    overrides="SlurmdParameters=config_overrides"
    node_cpus="CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1"
fi

mkdir -p "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
chown slurm:slurm /var/lib/slurm/slurmctld /var/log/slurm
new_conf="$(mktemp)"
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by deploy/slurm/start-local-slurm.sh: a single-node Slurm for tests.
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
KillWait=5
MinJobAge=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldDebug=info
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdDebug=info
SlurmdLogFile=/var/log/slurm/slurmd.log
$overrides
NodeName=$NODE NodeAddr=127.0.0.1 $node_cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$new_conf" "$CONF"; then
    if running_pid /run/slurmctld.pid slurmctld >/dev/null \
            || running_pid /run/slurmd.pid slurmd >/dev/null; then
        say "configuration changed: restarting slurmd and slurmctld"
        stop_daemon /run/slurmd.pid slurmd
        stop_daemon /run/slurmctld.pid slurmctld
    fi
    install -m 0644 "$new_conf" "$CONF"
fi

# --- 4. daemons --------------------------------------------------------------------------
if ! running_pid /run/slurmctld.pid slurmctld >/dev/null; then
    say "starting slurmctld"
    /usr/sbin/slurmctld        # daemonizes, drops to user slurm
fi
if ! running_pid /run/slurmd.pid slurmd >/dev/null; then
    say "starting slurmd"
    /usr/sbin/slurmd
fi

# --- 5. wait for the node ----------------------------------------------------------------
state=""
for i in $(seq 1 $(( WAIT * 5 ))); do
    state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*)
            # left down by an unclean stop: return it to service once
            [ "$i" -eq 25 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) die "node $NODE is not ready after ${WAIT}s (sinfo state: '${state:-none}'); see /var/log/slurm/" ;;
esac
say "ready: $(sinfo -h -o '%P %a %l %D %T %N %c' | head -1)"
