#!/usr/bin/env bash
# Install remediator system-wide on Debian 12, as root:
#
#   scripts/install.sh && remediator audit
#
# What it does, each step skipped when already done (so running it again upgrades in place):
#   1. apt: python3, python3-venv, python3-pip and python3-bpfcc. BCC's Python bindings exist only
#      as the distribution package; the PyPI project called "bcc" is unrelated.
#   2. a venv at /opt/remediator/venv made from /usr/bin/python3 with --system-site-packages, so
#      that `import bcc` finds python3-bpfcc, and this repository pip-installed into it.
#   3. a symlink /usr/local/sbin/remediator -> the venv's entry point.
#
# REMEDIATOR_VENV and REMEDIATOR_LINK override those two paths (the tests install into a
# temporary directory that way).
#
# Why /usr/local/sbin and not /usr/local/bin: remediator writes /proc/sys and signals containers,
# so it is an administrator's command that only root runs (FHS 3.0, 4.9.2: sbin holds programs
# for system administration). /usr/local/sbin is on root's PATH on Debian (/etc/profile for uid 0,
# sudo's secure_path, systemd's default unit PATH) and, on purpose, not on other users' PATH.
#
# Output is one line on success; a failing step prints its command's log.
#
# The helpers below are shared: scripts/test.sh sources this file for apt_install and run_quiet,
# and only the "main" at the bottom runs when the file is executed.
set -euo pipefail

# Die with a message on stderr.
die() {
    echo "error: $*" >&2
    exit 1
}

# run_quiet LOG CMD...: run CMD with its output in LOG; on failure show the LOG's tail and fail.
run_quiet() {
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        echo "error: command failed: $*" >&2
        echo "---- last 40 lines of $log ----" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
}

# The dpkg state of each package, so that nothing is asked of apt when all are installed.
missing_packages() {
    local pkg
    for pkg in "$@"; do
        if [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) != installed ]]; then
            echo "$pkg"
        fi
    done
}

# True when some package list was fetched less than a day ago. apt gives downloaded lists the
# server's Last-Modified time, so a list that has not changed upstream looks old: at worst that
# costs one extra `apt-get update` when something is missing.
apt_lists_fresh() {
    [[ -n $(find /var/lib/apt/lists -maxdepth 1 -type f \( -name '*_Packages*' -o -name '*InRelease' \) \
        -mmin -1440 -print -quit 2>/dev/null) ]]
}

apt_lists_present() {
    [[ -n $(find /var/lib/apt/lists -maxdepth 1 -type f -name '*_Packages*' -print -quit 2>/dev/null) ]]
}

# apt_install PKG...: install the missing ones, non-interactively.
apt_install() {
    local missing log policy_rc=/usr/sbin/policy-rc.d made_policy=0 rc=0
    mapfile -t missing < <(missing_packages "$@")
    ((${#missing[@]})) || return 0
    log=$(mktemp -t remediator-apt.XXXXXX.log)
    export DEBIAN_FRONTEND=noninteractive
    local -a install=(apt-get install -y -q --no-install-recommends
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}")

    # Maintainer scripts must not start services: PID 1 is not systemd on our machines, and
    # docker.io's postinst would run /etc/init.d/docker and fail the install if dockerd cannot come
    # up there. policy-rc.d exit code 101 means "action forbidden"
    # (/usr/share/doc/init-system-helpers/README.policy-rc.d); scripts/start-daemons.sh starts
    # what the tests need. An existing policy-rc.d is the machine owner's and is left alone.
    if [[ ! -e $policy_rc ]]; then
        printf '#!/bin/sh\n# temporary, from remediator scripts/install.sh\nexit 101\n' >"$policy_rc"
        chmod 755 "$policy_rc"
        made_policy=1
    fi

    if ! apt_lists_present || ! apt_lists_fresh; then
        run_quiet "$log" apt-get update -q || rc=$?
    fi
    if ((rc == 0)) && ! run_quiet "$log" "${install[@]}" 2>/dev/null; then
        # Stale lists name package versions the mirror no longer has: refresh once and retry.
        run_quiet "$log" apt-get update -q && run_quiet "$log" "${install[@]}" || rc=$?
    fi

    if ((made_policy)); then rm -f "$policy_rc"; fi
    if ((rc != 0)); then return "$rc"; fi
    rm -f "$log"
    # The packages just installed must really be there (a held or broken package is no success).
    mapfile -t missing < <(missing_packages "$@")
    ((${#missing[@]} == 0)) || die "apt-get did not install: ${missing[*]}"
}

# make_venv DIR: a venv from Debian's python3 that sees python3-bpfcc; (re)made when DIR is not one.
make_venv() {
    local dir=$1 cfg=$1/pyvenv.cfg
    if [[ -x $dir/bin/python && -f $cfg ]] &&
        grep -qx 'home = /usr/bin' "$cfg" &&
        grep -qx 'include-system-site-packages = true' "$cfg" &&
        "$dir/bin/python" -c 'import bcc' 2>/dev/null; then
        return 0
    fi
    if [[ -e $dir ]]; then
        echo "note: $dir is not a venv of /usr/bin/python3 with system site packages; remaking it" >&2
    fi
    local log
    log=$(mktemp -t remediator-venv.XXXXXX.log)
    run_quiet "$log" /usr/bin/python3 -m venv --clear --system-site-packages "$dir"
    rm -f "$log"
    "$dir/bin/python" -c 'import bcc' 2>/dev/null ||
        die "$dir cannot import bcc: is python3-bpfcc installed for /usr/bin/python3?"
}

main() {
    local repo log found
    local venv=${REMEDIATOR_VENV:-/opt/remediator/venv} link=${REMEDIATOR_LINK:-/usr/local/sbin/remediator}
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    [[ $(id -u) == 0 ]] || die "run as root: remediator writes /proc/sys and talks to dockerd"
    [[ -f $repo/pyproject.toml ]] || die "$repo does not look like the remediator repository"

    # gcc and python3-dev build the fifo walk's C loop (remediator/actions/_fifowalk.c).
    apt_install python3 python3-venv python3-pip python3-bpfcc python3-dev gcc libc6-dev
    mkdir -p "$(dirname "$venv")" "$(dirname "$link")"
    make_venv "$venv"

    log=$(mktemp -t remediator-pip.XXXXXX.log)
    # --upgrade with a directory rebuilds and reinstalls the package even at the same version.
    run_quiet "$log" "$venv/bin/pip" install --upgrade "$repo"
    rm -f "$log"

    [[ -x $venv/bin/remediator ]] || die "pip did not install the remediator entry point"
    ln -sfn "$venv/bin/remediator" "$link"

    found=$(command -v remediator || true)
    if [[ -z ${REMEDIATOR_LINK:-} && $found != "$link" ]]; then
        echo "warning: 'remediator' resolves to '${found:-nothing}' on this PATH, not $link;" \
            "add /usr/local/sbin to root's PATH or call $link" >&2
    fi
    echo "remediator $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("remediator"))')" \
        "installed: $link -> $venv/bin/remediator"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
