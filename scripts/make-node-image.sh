#!/usr/bin/env bash
# Build (once per project change) remediator's node image for the DaemonSet, as a docker-archive
# tar that `ctr -n k8s.io images import` and `docker load` read, with no registry:
#
#   scripts/make-node-image.sh [CACHE]      (CACHE default /var/cache/remediator-test)
#
# prints the tar's path (CACHE/node-image/remediator-node.tar, image remediator/node:0.1.0).
#
# * The rootfs: Debian 12 (debootstrap --variant=minbase, python3 + python3-venv, ~120 MB),
#   from the host's own Debian mirror (its apt sources, as make-systemd-rootfs.sh), cached in
#   CACHE/node-image/base with a `ready` mark; the .debs in CACHE/node-image/debs.
# * The project: a wheel built on the host from this checkout, its dependencies as wheels from
#   the host's pip configuration and cache (`pip wheel`), installed offline into /opt/remediator
#   (a venv of the image's python3, the same Debian 3.11 as the host's), with `ctr` (containerd's
#   client, which the fifos probe and the CRI label fallback run) from the host's Debian
#   containerd package.
# * The stamp: a digest of the project's files and this script. The tar is rebuilt when it is
#   missing or the stamp changed; the base rootfs only when it is missing.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-/var/cache/remediator-test}
dir=$cache/node-image
base=$dir/base
tar_out=$dir/remediator-node.tar
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)
image=remediator/node:$version
packages=python3,python3-venv

stamp() {
    (cd "$repo" && find remediator policies pyproject.toml setup.py README.md scripts/make-node-image.sh \
        -type f ! -name '*.so' ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 |
        sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

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

want=$(stamp)-$image
if [[ -f $tar_out && -f $dir/stamp && $(cat "$dir/stamp") == "$want" ]]; then
    echo "$tar_out"
    exit 0
fi
mkdir -p "$dir"
exec 9>"$dir/lock"
flock 9

if [[ ! -f $base/ready ]]; then
    command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed" >&2; exit 1; }
    uri=$(mirror)
    [[ -n $uri ]] || { echo "error: no bookworm archive in the host's apt sources" >&2; exit 1; }
    rm -rf "$base.tmp"
    mkdir -p "$dir/debs"
    debootstrap --variant=minbase --include="$packages" --cache-dir="$dir/debs" \
        bookworm "$base.tmp" "$uri" >"$dir/debootstrap.log" 2>&1 ||
        { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
    rm -rf "$base"
    mv "$base.tmp" "$base"
    touch "$base/ready"
fi

work=$(mktemp -d "$dir/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
py=${PYTHON:-python3}
[[ -x $repo/.venv/bin/python ]] && py=$repo/.venv/bin/python

# The wheels, on the host: this checkout's and every dependency's (pip's own configuration and
# cache on the host decide where they come from).
"$py" -m pip wheel --quiet --wheel-dir "$work/wheels" "$repo" >"$work/pip-wheel.log" 2>&1 ||
    { tail -20 "$work/pip-wheel.log" >&2; exit 1; }

# The rootfs: a copy of the base, the project installed offline in a chroot.
root=$work/root
cp -a "$base" "$root"
rm -f "$root/ready"
mkdir -p "$root/tmp/wheels"
cp "$work/wheels"/*.whl "$root/tmp/wheels/"
chroot "$root" /usr/bin/python3 -m venv /opt/remediator
chroot "$root" /opt/remediator/bin/pip install --quiet --no-index --no-cache-dir \
    --disable-pip-version-check --find-links /tmp/wheels remediator >"$work/pip-install.log" 2>&1 ||
    { tail -20 "$work/pip-install.log" >&2; exit 1; }
ctr_bin=$(command -v ctr) || { echo "error: ctr is not installed on the host" >&2; exit 1; }
install -m 0755 "$ctr_bin" "$root/usr/local/bin/ctr"
chroot "$root" /opt/remediator/bin/remediator --version >/dev/null
chroot "$root" /usr/local/bin/ctr --version >/dev/null
# What a running agent never reads: docs, locales, apt's lists and caches, the wheels.
rm -rf "$root/tmp/wheels" "$root"/usr/share/{doc,man,info,locale}/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old "$root"/var/log/*.log
find "$root/dev" -mindepth 1 -delete
find "$root/opt/remediator" -name __pycache__ -prune -o -name '*.py' -print0 |
    xargs -0 chroot "$root" /opt/remediator/bin/python -m compileall -q >/dev/null 2>&1 || true

# One layer, the docker-archive around it (what `docker save` writes).
tar -C "$root" --numeric-owner --sort=name --mtime=@0 -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
mkdir -p "$work/archive/$diff_id"
mv "$work/layer.tar" "$work/archive/$diff_id/layer.tar"
cat >"$work/config.json" <<JSON
{"architecture":"amd64","os":"linux",
 "config":{"Entrypoint":null,"Cmd":["remediator","run"],
  "Env":["PATH=/opt/remediator/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"],
  "Labels":{"org.opencontainers.image.title":"remediator","org.opencontainers.image.version":"$version"}},
 "rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},
 "history":[{"created_by":"scripts/make-node-image.sh"}]}
JSON
config_id=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/archive/$config_id.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]\n' \
    "$config_id" "$image" "$diff_id" >"$work/archive/manifest.json"
tar -C "$work/archive" -cf "$tar_out.tmp" manifest.json "$config_id.json" "$diff_id"
mv "$tar_out.tmp" "$tar_out"
echo "$want" >"$dir/stamp"
echo "$tar_out"
