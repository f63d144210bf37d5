#!/usr/bin/env bash
# Build (once) the Debian 12 root filesystem that the systemd tier boots as PID 1 in a container,
# and import it as the Docker image remediator-test/systemd:bookworm:
#
#   scripts/make-systemd-rootfs.sh [CACHE]      (CACHE default /var/cache/remediator-test)
#
# The rootfs (debootstrap --variant=minbase: systemd, dbus, python3 and the distribution
# packages remediator's venv takes from the system, about 250 MB) is kept in
# CACHE/systemd-rootfs/bookworm and rebuilt only when missing (a `ready` file marks a finished
# build); the image is re-imported when missing. The project itself is not copied in: the tests
# bind-mount the checkout and its .venv (made from the same Debian python3) read-only.
# The archive is the host's own Debian mirror (from its apt sources), so nothing is named here.
set -euo pipefail

cache=${1:-/var/cache/remediator-test}
root=$cache/systemd-rootfs/bookworm
image=remediator-test/systemd:bookworm
packages=systemd,systemd-sysv,dbus,procps,python3,python3-yaml

mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        if grep -qE '^Suites:.*\b(bookworm|bookworm-updates)\b' "$f"; then
            uri=$(awk '/^URIs:/ {print $2; exit}' "$f")
            [[ -n $uri ]] && { echo "$uri"; return; }
        fi
    done
    awk '$1 == "deb" && $3 ~ /^bookworm/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null
}

if [[ ! -f $root/ready ]]; then
    command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed" >&2; exit 1; }
    uri=$(mirror)
    [[ -n $uri ]] || { echo "error: no bookworm archive in the host's apt sources" >&2; exit 1; }
    rm -rf "$root.tmp"
    mkdir -p "$cache/systemd-rootfs/debs"
    debootstrap --variant=minbase --include="$packages" --cache-dir="$cache/systemd-rootfs/debs" \
        bookworm "$root.tmp" "$uri" >"$cache/systemd-rootfs/debootstrap.log" 2>&1 ||
        { tail -20 "$cache/systemd-rootfs/debootstrap.log" >&2; exit 1; }
    # No getty on a console nobody reads; no units that wait for hardware.
    rm -f "$root.tmp"/etc/systemd/system/getty.target.wants/*
    rm -rf "$root"
    mv "$root.tmp" "$root"
    touch "$root/ready"
    docker image rm -f "$image" >/dev/null 2>&1 || true
fi

if ! docker image inspect "$image" >/dev/null 2>&1; then
    tar -C "$root" --exclude=./ready -c . | docker import - "$image" >/dev/null
fi
echo "$image"
