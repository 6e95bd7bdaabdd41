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

# shellcheck source=deploy/slurm/daemons.sh
source "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"

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
