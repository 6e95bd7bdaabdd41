#!/usr/bin/env bash
# Stop the single-node Slurm started by start-local-slurm.sh: cancel every job, then stop
# slurmd, slurmctld and munged by the pids in their pid files (checked against /proc/PID/comm,
# so a stale pid file never kills an unrelated process).
#
# Usage: stop-local-slurm.sh [--purge]
#   --purge   also remove the saved Slurm state (/var/lib/slurm/slurmctld/*) and logs.
set -euo pipefail

purge=0
[ "${1:-}" = "--purge" ] && purge=1

say() { echo "stop-local-slurm: $*"; }

running_pid() {  # running_pid PIDFILE NAME -> prints the pid if that daemon runs
    local pidfile=$1 name=$2 pid
    [ -f "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
    echo "$pid"
}

stop_daemon() {  # stop_daemon PIDFILE NAME
    local pid
    if ! pid="$(running_pid "$1" "$2")"; then
        rm -f "$1"
        return 0
    fi
    say "stopping $2 (pid $pid)"
    kill "$pid"
    for _ in $(seq 1 300); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.1
    done
    say "$2 (pid $pid) did not stop in 30 s; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

if running_pid /run/slurmctld.pid slurmctld >/dev/null; then
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
        say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        scancel $jobs || true
        for _ in $(seq 1 150); do
            [ -z "$(squeue -h -o %i 2>/dev/null || true)" ] && break
            sleep 0.1
        done
    fi
fi

stop_daemon /run/slurmd.pid slurmd
stop_daemon /run/slurmctld.pid slurmctld
stop_daemon /run/munge/munged.pid munged

if [ "$purge" -eq 1 ]; then
    say "removing the saved Slurm state and logs"
    rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/* /var/log/slurm/*
fi
say "stopped"
