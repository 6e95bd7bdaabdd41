# Shared by start-local-slurm.sh and stop-local-slurm.sh (sourced, not run): daemons are
# tracked by their pid files, checked against /proc/PID/comm so that a stale pid file never
# points at an unrelated process. The sourcing script defines say().

running_pid() {  # running_pid PIDFILE NAME -> prints the pid if that daemon runs
    local pidfile=$1 name=$2 pid
    [ -f "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
    echo "$pid"
}

stop_daemon() {  # stop_daemon PIDFILE NAME: SIGTERM, wait up to 30 s, then SIGKILL
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
