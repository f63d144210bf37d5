#!/usr/bin/env bash
# Fetch Debian packages from another suite (trixie, sid, ...) and unpack them into a cache
# directory, without touching the host's apt configuration:
#
#   scripts/suite-package.sh SUITE DEST PACKAGE[=VERSION]...
#
# prints DEST/SUITE/root, the directory the packages were unpacked into (dpkg -x), e.g.
# `scripts/suite-package.sh trixie /var/cache/remediator-test containerd` -> .../trixie/root with
# usr/bin/containerd in it. Nothing is installed: the binaries run from there, beside the
# system's own (the real tests start them as private instances on their own sockets).
#
# Why it works this way:
# - apt gets private options only: its own sources list, lists dir, cache and status file under
#   DEST/SUITE/apt (-o Dir::Etc::SourceList=..., -o Dir::State::Lists=...). The host's
#   /etc/apt and /var/lib/apt are read for nothing but the archive URI and keyring.
# - The archive URI is the one the host already uses for its own Debian suite (read from
#   /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list), so no mirror name is written
#   into this repository and the machine's own proxying applies.
# - A cache: a package already unpacked at the same version is not fetched again; delete DEST to
#   force it. The lists are refreshed when older than a day.
#
# Exit status: 0 when every package is unpacked; 1 with the failing apt command's output.
set -euo pipefail

die() {
    echo "error: $*" >&2
    exit 1
}

(($# >= 3)) || die "usage: $0 SUITE DEST PACKAGE[=VERSION]..."
suite=$1 dest=$2
shift 2
[[ $suite =~ ^[a-z][a-z0-9-]*$ ]] || die "bad suite name '$suite'"

# The host's Debian archive URI: the first deb URI whose suite list names a Debian release
# (bookworm, ...), from deb822 .sources files first, then one-line sources.list files.
host_archive_uri() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        uri=$(awk '
            /^[[:space:]]*$/ { if (uri != "" && deb && suite) { print uri; exit } uri = ""; deb = 0; suite = 0; next }
            /^Types:/ && / deb( |$)/ { deb = 1 }
            /^URIs:/ && $2 !~ /security/ { uri = $2 }
            /^Suites:/ && / (bookworm|trixie|sid|bullseye)( |$)/ { suite = 1 }
            END { if (uri != "" && deb && suite) print uri }
        ' "$f" | head -n 1)
        [[ -n $uri ]] && { echo "$uri"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        uri=$(awk '$1 == "deb" && $2 !~ /security/ && $3 ~ /^(bookworm|trixie|sid|bullseye)$/ { print $2; exit }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return 0; }
    done
    return 1
}

uri=$(host_archive_uri) || die "found no Debian archive URI in /etc/apt to fetch $suite packages from"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $keyring ]] || die "$keyring is missing (package debian-archive-keyring)"

top=$dest/$suite
aptdir=$top/apt
root=$top/root
mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/debs" "$root"
: >"$aptdir/status"
printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$uri" "$suite" >"$aptdir/sources.list"

APT_OPTS=(
    -o "Dir::Etc::SourceList=$aptdir/sources.list"
    -o "Dir::Etc::SourceParts=/nonexistent"
    -o "Dir::State::Lists=$aptdir/lists"
    -o "Dir::State::status=$aptdir/status"
    -o "Dir::Cache=$aptdir/cache"
    -o "Debug::NoLocking=1"
    -o "APT::Get::List-Cleanup=0"
)

log=$aptdir/last.log
if [[ -z $(find "$aptdir/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit) ]]; then
    apt-get "${APT_OPTS[@]}" update -q >"$log" 2>&1 || {
        tail -n 30 "$log" >&2
        die "apt-get update for $suite failed"
    }
fi

for spec in "$@"; do
    pkg=${spec%%=*}
    want=$(apt-cache "${APT_OPTS[@]}" policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2 }')
    [[ $spec == *=* ]] && want=${spec#*=}
    [[ -n $want && $want != "(none)" ]] || die "$suite has no package $pkg"
    stamp=$root/.unpacked-$pkg
    if [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
        continue
    fi
    (cd "$aptdir/debs" && apt-get "${APT_OPTS[@]}" download -q "$pkg=$want") >"$log" 2>&1 || {
        tail -n 30 "$log" >&2
        die "apt-get download $pkg=$want from $suite failed"
    }
    deb=$(find "$aptdir/debs" -maxdepth 1 -name "${pkg}_*.deb" -newer "$aptdir/sources.list" -print -quit)
    [[ -n $deb ]] || deb=$(find "$aptdir/debs" -maxdepth 1 -name "${pkg}_*.deb" -print | sort | tail -n 1)
    [[ -n $deb ]] || die "no .deb for $pkg after download"
    dpkg-deb -x "$deb" "$root"
    echo "$want" >"$stamp"
done
echo "$root"
