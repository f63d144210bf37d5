#!/usr/bin/env bash
# Install everything the tests need and run the whole suite, on Debian 12 as root:
#
#   scripts/test.sh [pytest args...]
#
# Phases, each timed: Debian packages (docker.io, containerd, busybox-static, python3-bpfcc...),
# the repo's .venv (/usr/bin/python3 with system site packages, for bcc) with `pip install -e
# .[test]`, the daemons (scripts/start-daemons.sh), the test image (scripts/make-test-image.sh),
# the static checks (ruff, mypy, import-linter), then pytest: the default suite (`-m "not slow"`)
# and the slow tier (`-m slow`), each timed.
#
# Static checks and pytest all run even when one fails, so one run shows every problem. Exit
# status: pytest's when it failed; 1 when only a static check failed; 1 when pytest collected no
# test (its exit 5), since a suite that ran nothing proves nothing.
#
# The real tier must run here: REMEDIATOR_REQUIRE_REAL=1 turns its skips into failures, unless
# the caller set REMEDIATOR_SKIP_REAL=1 on purpose (then they stay skips, with a banner).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/install.sh
source scripts/install.sh # apt_install, make_venv, run_quiet, die

VENV=.venv
LOG_DIR=/var/log/remediator-test
TEST_PACKAGES=(
    python3 python3-venv python3-pip python3-bpfcc # the venv, and BCC's bindings for it
    python3-dev                                    # builds remediator/actions/_fifowalk.c (with gcc)
    docker.io containerd runc                      # the real tier's daemons
    iptables                                       # dockerd's bridge rules
    iproute2 util-linux                            # ip netns + nsenter: the private docker 26
    procps                                         # ps for `docker top`; /bin/kill for the unit
    cgroupfs-mount                                 # only used when no cgroup fs is mounted
    busybox-static                                 # the test image's only binary
    gcc libc6-dev                                  # static helpers built by real tests (C)
    systemd                                        # systemd-analyze verify for the unit file
    strace                                         # the audit-writes-nothing test traces every write
    prometheus prometheus-alertmanager             # promtool/amtool checks; the real scrape-and-alert test
    debootstrap                                    # the systemd tier's rootfs (scripts/make-systemd-rootfs.sh)
    qemu-system-x86                                # the cgroup v2 VM (scripts/make-cgv2-vm.py, slow tier)
    golang-1.19-go rsync jq dpkg-dev               # scripts/make-kube.sh builds Kubernetes 1.20 from source
    containernetworking-plugins openssl            # the Kubernetes node's CNI bridge; its certificates
    git ca-certificates
)

PHASES=()
phase_start=0
phase() {
    local now
    now=$(date +%s.%N)
    if ((${#PHASES[@]})); then phase_end "$now"; fi
    PHASES+=("$1")
    phase_start=$now
    echo "== $1"
}
TIMES=()
phase_end() {
    TIMES+=("$(awk -v a="$phase_start" -v b="$1" 'BEGIN { printf "%.1f", b - a }')")
}
summary_done=0
summary() {
    ((${#PHASES[@]} && !summary_done)) || return 0
    summary_done=1
    phase_end "$(date +%s.%N)"
    echo "== phase timings (s)"
    local i
    for i in "${!PHASES[@]}"; do
        printf '   %-16s %7s\n' "${PHASES[$i]}" "${TIMES[$i]}"
    done
}

[[ $(id -u) == 0 ]] || die "run as root: the real tier writes /proc/sys, mounts and talks to dockerd"
mkdir -p "$LOG_DIR"
# Timings also when a phase fails and set -e ends the script.
trap 'summary' EXIT

phase "packages"
apt_install "${TEST_PACKAGES[@]}"

phase "venv"
make_venv "$VENV"
run_quiet "$LOG_DIR/pip.log" "$VENV/bin/pip" install -e '.[test]'

phase "daemons"
scripts/start-daemons.sh

phase "test-image"
scripts/make-test-image.sh

# containerd 1.7.24 (trixie) and 2.1.9 (sid), unpacked into the cache for the real tier's private
# instances (tests/real/private_containerd.py); cached, so a no-op once fetched.
phase "containerds"
for suite in trixie sid; do
    scripts/suite-package.sh "$suite" /var/cache/remediator-test containerd >/dev/null
done

# Kubernetes 1.20 (control plane, kubelet, kubectl, etcd) for the slow tier's single-node cluster
# (tests/real/kube_node.py): built from Debian's source once (~15 min of 2 cores), then cached.
phase "kube"
scripts/make-kube.sh /var/cache/remediator-test >/dev/null

phase "static"
static_failed=()
"$VENV/bin/ruff" check . || static_failed+=(ruff)
"$VENV/bin/mypy" || static_failed+=(mypy)
"$VENV/bin/lint-imports" || static_failed+=(lint-imports)

phase "pytest"
if [[ ${REMEDIATOR_SKIP_REAL:-} != 1 ]]; then
    export REMEDIATOR_REQUIRE_REAL=1
fi
pytest_status=0
# -ra: the summary lists failures, errors and skips with reasons (a later -rs would narrow it).
# Without arguments: the default suite (every tier but the slow one), then the slow tier
# (booted systemd, VMs, version matrices, the Kubernetes node). Both must pass.
if (($#)); then
    "$VENV/bin/python" -m pytest -ra "$@" || pytest_status=$?
else
    "$VENV/bin/python" -m pytest -ra --durations=20 -m "not slow" || pytest_status=$?
    phase "pytest-slow"
    slow_status=0
    "$VENV/bin/python" -m pytest -ra --durations=20 -m slow || slow_status=$?
    if ((pytest_status == 0)); then
        pytest_status=$slow_status
    fi
fi

summary
if ((pytest_status == 5)); then
    echo "FAILED: pytest collected no tests" >&2
    exit 1
fi
if ((${#static_failed[@]})); then
    echo "FAILED: static checks: ${static_failed[*]}" >&2
    ((pytest_status != 0)) || exit 1
fi
exit "$pytest_status"
