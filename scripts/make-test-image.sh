#!/usr/bin/env bash
# Build the real tests' container image locally, with no registry: remediator-test/busybox:latest
# in dockerd, and the same image in containerd's "default" namespace for tests that use ctr
# (there it is named docker.io/remediator-test/busybox:latest, containerd's normalised form).
#
# The root filesystem is Debian's busybox-static (/bin/busybox, no shared libraries) with a link
# per applet, /tmp, and an /etc/passwd and /etc/group with root and nobody (for --user tests).
# Idempotent: nothing is built when the image carries the current recipe label; bump RECIPE when
# the recipe below changes. Needs both daemons answering (scripts/start-daemons.sh).
set -euo pipefail

IMAGE=remediator-test/busybox:latest
CTR_IMAGE=docker.io/$IMAGE
CTR_NAMESPACE=default
RECIPE=2
RECIPE_LABEL=remediator.test.recipe
DOCKER=(/usr/bin/docker -H unix:///var/run/docker.sock)
CTR=(ctr --address /run/containerd/containerd.sock --namespace "$CTR_NAMESPACE")
BUSYBOX=/bin/busybox

die() {
    echo "error: $*" >&2
    exit 1
}

docker_image_recipe() {
    "${DOCKER[@]}" image inspect --format "{{ index .Config.Labels \"$RECIPE_LABEL\" }}" "$IMAGE" 2>/dev/null || true
}

ROOTFS=
cleanup() {
    if [[ -n $ROOTFS ]]; then rm -rf "$ROOTFS"; fi
}
trap cleanup EXIT

build_docker_image() {
    local applet user
    [[ -x $BUSYBOX ]] || die "$BUSYBOX missing: apt-get install busybox-static"
    ROOTFS=$(mktemp -d -t remediator-rootfs.XXXXXX)

    mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev,run}
    install -d -m 1777 "$ROOTFS/tmp"
    install -m 755 "$BUSYBOX" "$ROOTFS/bin/busybox"
    # --list-full names each applet with its usual directory (bin/sh, usr/bin/awk, sbin/ip...).
    while read -r applet; do
        [[ $applet == */* ]] || continue # "linuxrc" and the like: not wanted at the root
        [[ -e $ROOTFS/$applet ]] || ln -s /bin/busybox "$ROOTFS/$applet"
    done < <("$BUSYBOX" --list-full)
    [[ -L $ROOTFS/bin/sh && -L $ROOTFS/bin/sleep ]] || die "busybox --list-full gave no bin/sh or bin/sleep"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
        >"$ROOTFS/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$ROOTFS/etc/group"

    tar --numeric-owner --owner=0 --group=0 -C "$ROOTFS" -c . |
        "${DOCKER[@]}" import \
            --change 'CMD ["/bin/sh"]' \
            --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
            --change "LABEL $RECIPE_LABEL=$RECIPE" \
            - "$IMAGE" >/dev/null

    # Smoke run: a dynamically linked busybox (not busybox-static) would fail here, with no libc
    # in the image.
    user=$("${DOCKER[@]}" run --rm --network none --user nobody "$IMAGE" sh -c 'sleep 0 && id -un') ||
        die "the new $IMAGE does not run"
    [[ $user == nobody ]] || die "the new $IMAGE runs, but --user nobody gave '$user'"
}

# The config digest of the image containerd holds under CTR_IMAGE, or nothing.
ctr_image_config() {
    local manifest
    manifest=$("${CTR[@]}" images ls "name==$CTR_IMAGE" 2>/dev/null | awk -v ref="$CTR_IMAGE" '$1 == ref { print $3 }')
    [[ -n $manifest ]] || return 0
    "${CTR[@]}" content get "$manifest" 2>/dev/null |
        /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["config"]["digest"])' 2>/dev/null || true
}

main() {
    local docker_id recipe
    [[ $(id -u) == 0 ]] || die "run as root"
    "${DOCKER[@]}" info >/dev/null 2>&1 || die "dockerd is not answering: run scripts/start-daemons.sh"

    recipe=$(docker_image_recipe)
    if [[ $recipe == "$RECIPE" ]]; then
        echo "docker: $IMAGE up to date (recipe $RECIPE)"
    else
        echo "docker: building $IMAGE (recipe $RECIPE; found '${recipe:-none}')"
        build_docker_image
    fi

    # docker 20.10's `docker save` writes the docker-archive layout (manifest.json, repositories,
    # one dir per layer), which `ctr images import` reads (and unpacks) in containerd 1.6; the
    # image keeps its id, so equal config digests mean containerd already has this very image.
    docker_id=$("${DOCKER[@]}" image inspect --format '{{.Id}}' "$IMAGE")
    if [[ $(ctr_image_config) == "$docker_id" ]]; then
        echo "containerd: $CTR_IMAGE up to date in namespace $CTR_NAMESPACE"
    else
        echo "containerd: importing $CTR_IMAGE into namespace $CTR_NAMESPACE"
        "${DOCKER[@]}" save "$IMAGE" | "${CTR[@]}" images import - >/dev/null
        [[ $(ctr_image_config) == "$docker_id" ]] || die "ctr images import did not give containerd $docker_id"
    fi
}

main "$@"
