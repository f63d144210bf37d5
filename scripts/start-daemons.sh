#!/usr/bin/env bash
# Make sure containerd and dockerd answer, starting each one that does not. As root.
#
# The real tests need both daemons, and PID 1 is not systemd on our machines (nor in CI), so no
# unit starts them. A daemon that already answers is left alone: never a second one on the same
# socket. Started daemons run detached (setsid + nohup, output in /var/log/remediator-test/) and
# keep running after this script; they outlive the test run on purpose, as a service would.
#
# Exit status 0 when both answer; otherwise 1 with the daemon's log tail.
set -euo pipefail

LOG_DIR=/var/log/remediator-test
CONTAINERD_SOCK=/run/containerd/containerd.sock
DOCKER_SOCK=/var/run/docker.sock
# Debian's docker.io client, same release as the daemon. /usr/local/bin/docker may be a newer,
# unrelated client that comes first on PATH.
DOCKER=/usr/bin/docker
WAIT_SECONDS=${REMEDIATOR_DAEMON_WAIT:-60}

die() {
    echo "error: $*" >&2
    exit 1
}

# ctr waits 10s for a socket that is not there unless told otherwise; the outer timeout bounds a
# daemon that accepts but does not reply.
containerd_answers() {
    [[ -S $CONTAINERD_SOCK ]] &&
        timeout 10 ctr --address "$CONTAINERD_SOCK" --connect-timeout 2s version >/dev/null 2>&1
}

dockerd_answers() {
    [[ -S $DOCKER_SOCK ]] && timeout 20 "$DOCKER" -H "unix://$DOCKER_SOCK" info >/dev/null 2>&1
}

# Mount cgroup hierarchies only when none is mounted at all: both daemons need them, and a
# machine that mounted its own (v2 unified, v1, or a hybrid like our VMs) is not ours to change.
# cgroupfs-mount is Debian's script for exactly this no-systemd case (it mounts cgroup v1).
ensure_cgroups() {
    if awk '$3 == "cgroup" || $3 == "cgroup2" { found = 1 } END { exit !found }' /proc/self/mounts; then
        return 0
    fi
    command -v cgroupfs-mount >/dev/null || die "no cgroup hierarchy is mounted and cgroupfs-mount is missing"
    echo "no cgroup hierarchy mounted: running cgroupfs-mount"
    cgroupfs-mount
}

# A daemon killed with its session (CI starts after the session's processes are gone) leaves its
# pid file; dockerd refuses to start while the pid in it names any running process, which after
# pid reuse may be an unrelated one. Only a file whose pid is not a running NAME is removed.
remove_stale_pidfile() {
    local file=$1 name=$2 pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
        return 0
    fi
    echo "$name: removing stale $file (pid '${pid}' is not a running $name)"
    rm -f "$file"
}

# start NAME CHECK_FN CMD...: start CMD detached unless CHECK_FN already succeeds; wait for it.
start() {
    local name=$1 check=$2 log=$LOG_DIR/$1.log pid deadline t0=$SECONDS
    shift 2
    if "$check"; then
        echo "$name: already answering"
        return 0
    fi
    echo "$name: starting (log: $log)"
    {
        echo "==== $(date -u +%FT%TZ) started by scripts/start-daemons.sh: $*"
    } >>"$log"
    # All three standard streams are redirected so that the daemon holds no pipe of the caller's
    # open (a CI runner waiting for EOF would otherwise wait for the daemon to exit).
    setsid nohup "$@" </dev/null >>"$log" 2>&1 &
    pid=$!
    deadline=$((SECONDS + WAIT_SECONDS))
    until "$check"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: $name exited while starting; last lines of $log:" >&2
            tail -n 30 "$log" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "error: $name did not answer within ${WAIT_SECONDS}s (pid $pid left running);" \
                "last lines of $log:" >&2
            tail -n 30 "$log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "$name: answering after $((SECONDS - t0))s (pid $pid)"
}

main() {
    local -a dockerd_args=(--containerd="$CONTAINERD_SOCK")
    [[ $(id -u) == 0 ]] || die "run as root"
    for bin in containerd ctr dockerd "$DOCKER"; do
        command -v "$bin" >/dev/null || die "$bin not found: run scripts/test.sh (it installs docker.io and containerd)"
    done
    mkdir -p "$LOG_DIR"
    ensure_cgroups

    start containerd containerd_answers containerd

    # dockerd programs NAT and isolation rules with iptables at start and refuses to start when
    # that fails. The tests use no container networking beyond the default bridge, so on a kernel
    # without a working iptables backend (nf_tables on Debian 12 by default) start it without
    # rules instead of not at all.
    if ! dockerd_answers && ! iptables -w -n -L >/dev/null 2>&1; then
        echo "dockerd: iptables does not work here; starting with --iptables=false"
        dockerd_args+=(--iptables=false --ip6tables=false)
    fi
    remove_stale_pidfile /var/run/docker.pid dockerd
    start dockerd dockerd_answers dockerd "${dockerd_args[@]}"
}

main "$@"
