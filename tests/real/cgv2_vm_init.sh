#!/bin/busybox sh
# /init of the cgroup v2 test VM (scripts/make-cgv2-vm.py puts it in the initramfs).
#
# Mounts cgroup2 alone (so the memory controller is v2's), the host's /usr, the checkout and the
# dcache_load directory read-only over virtio-9p, and an ext4 filesystem on a loop device (tmpfs
# keeps no negative dentries); then runs the project's guest program with the host's own Python
# (tests/real/cgv2_vm_guest.py), prints its exit status and powers off.
#
# Kernel command line (set by tests/real/test_cgroup_v2_vm_real.py):
#   rmd.repo=DIR        the checkout, mounted at the same path as on the host
#   rmd.prefix=DIR      sys.prefix of the host's interpreter if outside /usr and DIR (a venv)
#   rmd.python=PATH     the interpreter to run (the host's sys.executable)
#   rmd.lookups=N       failed lookups to make in the memcg
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=256m tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup

for ko in /modules/*.ko; do
    insmod "$ko" || echo "CGV2-INIT insmod $ko failed"
done

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^rmd\.$1=//p"; }
REPO=$(arg repo) PREFIX=$(arg prefix) PY=$(arg python) LOOKUPS=$(arg lookups)

share() { # tag mountpoint
    mkdir -p "$2" && mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose "$1" "$2" ||
        echo "CGV2-INIT cannot mount 9p tag $1 at $2"
}
share usr /usr
share repo "$REPO"
share load /load
[ -n "$PREFIX" ] && share prefix "$PREFIX"

dd if=/dev/zero of=/tmp/fs.img bs=1M count=96 2>/dev/null
mkdir -p /mnt/ext4
# busybox mke2fs writes only to a block device; the ext4 driver mounts its ext2 layout.
losetup /dev/loop0 /tmp/fs.img && mke2fs -q /dev/loop0 >/dev/null && mount -t ext4 /dev/loop0 /mnt/ext4 ||
    echo "CGV2-INIT cannot mount the ext4 loop filesystem"

cd "$REPO" && "$PY" -m tests.real.cgv2_vm_guest /mnt/ext4 /load/dcache_load "$LOOKUPS"
echo "CGV2-EXIT $?"
poweroff -f
