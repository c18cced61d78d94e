#!/usr/bin/env bash
# Builds (once) the small Debian 12 guest the e2e boot test runs, as
# /work/shared/traces/README.md describes it: debootstrap minbase bookworm
# plus linux-image-amd64, systemd-sysv and udev; a 4 GiB ext4 root as a raw
# file (filled with mkfs.ext4 -d, no loop mounts); the kernel and initrd
# beside it for direct kernel boot; a oneshot unit that powers the guest off
# as soon as multi-user.target is reached; the console on ttyS0.
#
#   tests/e2e/build_guest.sh            build if missing, print the guest dir
#   BOOTCACHE_GUEST_CACHE=DIR ...       cache root (default /var/cache/bootcache-tests)
#   BOOTCACHE_DEBIAN_MIRROR=URL ...     mirror (default http://deb.debian.org/debian)
#
# The guest lands in $CACHE/$GUEST_VERSION/ with root.raw, vmlinuz, initrd.img
# and manifest.txt. It is built in a temporary directory next to it and renamed
# into place at the very end, under a lock, so an interrupted build never
# leaves a half guest and concurrent runs build it once. Bump GUEST_VERSION
# whenever the recipe below changes. Needs root (debootstrap, chroot).
set -euo pipefail

GUEST_VERSION=guest-v2
CACHE=${BOOTCACHE_GUEST_CACHE:-/var/cache/bootcache-tests}
MIRROR=${BOOTCACHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
ROOT_SIZE=4G
OUT=$CACHE/$GUEST_VERSION
# The poweroff unit prints this line on the console; the test looks for it.
MARKER="bootcache-e2e: multi-user.target reached, powering off"

log() { echo "build_guest: $*" >&2; }

if [ -f "$OUT/manifest.txt" ]; then
  echo "$OUT"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "needs root (debootstrap and chroot); $OUT does not exist yet"
  exit 77
fi
for tool in debootstrap mkfs.ext4 chroot flock; do
  command -v "$tool" >/dev/null || { log "$tool not found"; exit 77; }
done

mkdir -p "$CACHE"
exec 9>"$CACHE/.$GUEST_VERSION.lock"
flock 9
if [ -f "$OUT/manifest.txt" ]; then  # built by another run while we waited
  echo "$OUT"
  exit 0
fi

# Unmount whatever debootstrap or an earlier, interrupted build left mounted
# below $1, deepest first.
unmount_below() {
  local dir
  dir=$(realpath -m "$1")
  awk -v d="$dir/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" || true; done
}

remove_build() {
  unmount_below "$1"
  rm -rf --one-file-system "$1"
}

# Leftovers of interrupted builds of this version (we hold the lock).
for stale in "$CACHE/.$GUEST_VERSION.build."*; do
  [ -e "$stale" ] || continue
  log "removing the interrupted build $stale"
  remove_build "$stale"
done

start=$(date +%s)
work=$(mktemp -d "$CACHE/.$GUEST_VERSION.build.XXXXXX")
trap 'remove_build "$work"' EXIT
rootfs=$work/rootfs

log "debootstrap $SUITE from $MIRROR into $rootfs"
debootstrap --variant=minbase --include=linux-image-amd64,systemd-sysv,udev \
  "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 40 "$work/debootstrap.log" >&2
  log "debootstrap failed"
  exit 1
}
unmount_below "$rootfs"

log "configuring the guest"
echo bootcache-guest >"$rootfs/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$rootfs/etc/fstab"
ln -sf /lib/systemd/system/multi-user.target "$rootfs/etc/systemd/system/default.target"
# The Debian initramfs with MODULES=most carries virtio_blk; make it explicit.
mkdir -p "$rootfs/etc/initramfs-tools/conf.d"
echo MODULES=most >"$rootfs/etc/initramfs-tools/conf.d/bootcache.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >>"$rootfs/etc/initramfs-tools/modules"

# Boots must read the same blocks every time (the test checks that a second
# boot reads nothing the first did not): no login prompt racing with the
# poweroff (systemd's getty generator would start one on ttyS0), and the
# poweroff waits for the job queue to drain (units ordered after
# multi-user.target), so shutdown always starts from a quiet system. The
# unit is Type=simple: a oneshot would itself keep the queue busy.
ln -sf /dev/null "$rootfs/etc/systemd/system/getty.target"
ln -sf /dev/null "$rootfs/etc/systemd/system/serial-getty@ttyS0.service"
cat >"$rootfs/etc/systemd/system/bootcache-poweroff.service" <<EOF
[Unit]
Description=Power off as soon as multi-user.target is reached (bootcache e2e)
After=multi-user.target

[Service]
Type=simple
ExecStart=/bin/sh -c 'systemctl is-system-running --wait >/dev/null; echo "$MARKER" >/dev/console; exec systemctl --no-block poweroff'

[Install]
WantedBy=multi-user.target
EOF
mkdir -p "$rootfs/etc/systemd/system/multi-user.target.wants"
ln -sf ../bootcache-poweroff.service \
  "$rootfs/etc/systemd/system/multi-user.target.wants/bootcache-poweroff.service"

kver=$(basename "$(ls -d "$rootfs"/lib/modules/*/ | head -n 1)")
log "rebuilding the initramfs of $kver"
chroot "$rootfs" update-initramfs -u -k "$kver" >"$work/initramfs.log" 2>&1 || {
  cat "$work/initramfs.log" >&2
  exit 1
}
unmount_below "$rootfs"
chroot "$rootfs" lsinitramfs "/boot/initrd.img-$kver" >"$work/initrd.list"
if ! grep -q '/virtio_blk\.ko' "$work/initrd.list"; then
  log "the initramfs has no virtio_blk module"
  exit 1
fi

chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin

cp "$rootfs/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$work/initrd.img"

log "making the $ROOT_SIZE ext4 root"
truncate -s "$ROOT_SIZE" "$work/root.raw"
# Inode tables and journal are written now, so the guest's ext4lazyinit
# thread has nothing to do at boot.
mkfs.ext4 -q -F -L root -E lazy_itable_init=0,lazy_journal_init=0 \
  -d "$rootfs" "$work/root.raw"
remove_build "$rootfs"

cat >"$work/manifest.txt" <<EOF
version=$GUEST_VERSION
suite=$SUITE
mirror=$MIRROR
kernel=$kver
root_size=$ROOT_SIZE
marker=$MARKER
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$(($(date +%s) - start))
EOF
rm -f "$work"/*.log "$work/initrd.list"
chmod 755 "$work"
mv -T "$work" "$OUT"
trap - EXIT
log "built $OUT in $(($(date +%s) - start)) s"
echo "$OUT"
