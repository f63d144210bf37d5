#!/usr/bin/env bash
# Build (or take from the cache) a single-node Kubernetes control plane and kubelet for the real
# tier's Kubernetes tests (tests/real/kube_node.py), on Debian 12 as root:
#
#   scripts/make-kube.sh DEST
#
# prints DEST/kube-<version>, whose bin/ holds kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kubectl and etcd. No registry ships those binaries for us, so:
# - the source is Debian 12's `kubernetes` package (1.20.2), fetched with
#   `apt-get source --download-only` through private apt options (own sources list with a deb-src
#   line, own lists, cache and status under DEST/kube-apt; /etc/apt is only read for the archive
#   URI and keyring, as in scripts/suite-package.sh) and unpacked with its Debian patches;
# - it is built the way debian/rules does, in GOPATH mode (GO111MODULE=off, CGO_ENABLED=0, a
#   $GOPATH/src/k8s.io/kubernetes symlink, `make WHAT=cmd/<binary>`) with golang-1.19, under
#   `nice -n 10` so that other work on the machine is not starved (it takes ~15 min of 2 cores);
# - etcd is Debian's etcd-server 3.4 (`apt-get download`, `dpkg-deb -x`), nothing installed.
#
# A cache: DEST/kube-<version>/.recipe holds a hash of this script; when it matches and every
# binary is there, nothing is done. The ~2 GB build tree is removed afterwards, also on failure.
# The build's output goes to DEST/kube-build.log. Concurrent calls wait for each other (flock).
#
# Exit status: 0 with the directory printed; 1 with the failing step's log tail.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/install.sh
source "$here/install.sh" # apt_install, die

(($# == 1)) || die "usage: $0 DEST"
dest=$1
[[ $(id -u) == 0 ]] || die "run as root (apt-get install of the build dependencies)"

SUITE=bookworm
SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
KUBE_VERSION=v1.20.2
GO_PACKAGE=golang-1.19-go
GOROOT_DIR=/usr/lib/go-1.19
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
BUILD_DEPS=("$GO_PACKAGE" rsync jq dpkg-dev)

out=$dest/kube-${KUBE_VERSION#v}
recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)

cached() {
    [[ -f $out/.recipe && $(<"$out/.recipe") == "$recipe" ]] || return 1
    local b
    for b in "${BINARIES[@]}" etcd; do
        [[ -x $out/bin/$b ]] || return 1
    done
}

mkdir -p "$dest"
exec 9>"$dest/kube.lock"
flock 9
if cached; then
    echo "$out"
    exit 0
fi

log=$dest/kube-build.log
: >"$log"
step() {
    echo "== $(date -u +%H:%M:%S) $*" >>"$log"
}
# run CMD...: CMD's output appended to the log; on failure the log's tail and exit 1.
run() {
    if ! "$@" >>"$log" 2>&1; then
        echo "error: failed: $*" >&2
        echo "---- last 40 lines of $log ----" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}

step "build dependencies: ${BUILD_DEPS[*]}"
apt_install "${BUILD_DEPS[@]}"
[[ -x $GOROOT_DIR/bin/go ]] || die "$GOROOT_DIR/bin/go is missing after installing $GO_PACKAGE"

# Private apt options: the host's archive URI and keyring, everything else under DEST/kube-apt.
uri=$(awk '
    /^[[:space:]]*$/ { if (uri != "" && deb && suite) { print uri; exit } uri = ""; deb = 0; suite = 0; next }
    /^Types:/ && / deb( |$)/ { deb = 1 }
    /^URIs:/ && $2 !~ /security/ { uri = $2 }
    /^Suites:/ && / bookworm( |$)/ { suite = 1 }
    END { if (uri != "" && deb && suite) print uri }
' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
if [[ -z $uri ]]; then
    uri=$(awk '$1 == "deb" && $2 !~ /security/ && $3 == "bookworm" { print $2; exit }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
fi
[[ -n $uri ]] || die "found no Debian $SUITE archive URI in /etc/apt"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $keyring ]] || die "$keyring is missing (package debian-archive-keyring)"

aptdir=$dest/kube-apt
mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/src" "$aptdir/debs"
: >"$aptdir/status"
{
    printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$uri" "$SUITE"
    printf 'deb-src [signed-by=%s] %s %s main\n' "$keyring" "$uri" "$SUITE"
} >"$aptdir/sources.list"
APT_OPTS=(
    -o "Dir::Etc::SourceList=$aptdir/sources.list"
    -o "Dir::Etc::SourceParts=/nonexistent"
    -o "Dir::State::Lists=$aptdir/lists"
    -o "Dir::State::status=$aptdir/status"
    -o "Dir::Cache=$aptdir/cache"
    -o "Debug::NoLocking=1"
    -o "APT::Get::List-Cleanup=0"
    -o "APT::Sandbox::User=root"
)

step "apt-get update (private lists)"
run apt-get "${APT_OPTS[@]}" update -q

step "source kubernetes=$SRC_VERSION"
if [[ ! -f $aptdir/src/kubernetes_$SRC_VERSION.dsc ]]; then
    (cd "$aptdir/src" && run apt-get "${APT_OPTS[@]}" source --download-only -q "kubernetes=$SRC_VERSION")
fi

build=$dest/kube-build
cleanup() {
    rm -rf "$build"
}
trap cleanup EXIT
rm -rf "$build"
mkdir -p "$build"
tree=$build/kubernetes
step "unpack into $tree"
# apt checked the files against the signed Sources index; dpkg-source applies Debian's patches.
run dpkg-source --no-check -x "$aptdir/src/kubernetes_$SRC_VERSION.dsc" "$tree"

step "build ${BINARIES[*]}"
export GOPATH=$build/gopath
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$tree" "$GOPATH/src/k8s.io/kubernetes"
# No .git in a source package: the version stamped into the binaries comes from this file.
version_file=$build/version
major=${KUBE_VERSION#v}
minor=${major#*.}
cat >"$version_file" <<EOF
KUBE_GIT_COMMIT='debian-$SRC_VERSION'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='$KUBE_VERSION'
KUBE_GIT_MAJOR='${major%%.*}'
KUBE_GIT_MINOR='${minor%%.*}'
EOF
what=()
for b in "${BINARIES[@]}"; do what+=("cmd/$b"); done
(
    cd "$GOPATH/src/k8s.io/kubernetes"
    export PATH=$GOROOT_DIR/bin:$PATH GO111MODULE=off CGO_ENABLED=0
    export GOCACHE=$build/gocache HOME=$build/home KUBE_GIT_VERSION_FILE=$version_file
    mkdir -p "$HOME"
    run nice -n 10 make WHAT="${what[*]}"
)

step "etcd-server"
rm -f "$aptdir/debs"/etcd-server_*.deb
(cd "$aptdir/debs" && run apt-get "${APT_OPTS[@]}" download -q etcd-server)
deb=$(find "$aptdir/debs" -maxdepth 1 -name 'etcd-server_*.deb' -print -quit)
[[ -n $deb ]] || die "no etcd-server .deb after apt-get download"
run dpkg-deb -x "$deb" "$build/etcd"

step "install into $out"
rm -rf "$out.new"
mkdir -p "$out.new/bin"
for b in "${BINARIES[@]}"; do
    install -m 0755 "$tree/_output/bin/$b" "$out.new/bin/$b"
done
install -m 0755 "$build/etcd/usr/bin/etcd" "$out.new/bin/etcd"
"$out.new/bin/kube-apiserver" --version >>"$log" 2>&1
"$out.new/bin/etcd" --version >>"$log" 2>&1
echo "$recipe" >"$out.new/.recipe"
rm -rf "$out"
mv "$out.new" "$out"
step "done"
echo "$out"
