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
BUILD_NAME=build_guest
# The poweroff unit prints this line on the console; the test looks for it.
MARKER="bootcache-e2e: multi-user.target reached, powering off"

# shellcheck source=../../tools/guest_build_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../tools/guest_build_lib.sh"

guest_build_begin
guest_debootstrap linux-image-amd64,systemd-sysv,udev

log "configuring the guest"
echo bootcache-guest >"$rootfs/etc/hostname"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$rootfs/etc/fstab"
ln -sf /lib/systemd/system/multi-user.target "$rootfs/etc/systemd/system/default.target"
guest_initramfs_modules
guest_poweroff_unit "Power off as soon as multi-user.target is reached (bootcache e2e)" "$MARKER"

guest_update_initramfs
chroot "$rootfs" lsinitramfs "/boot/initrd.img-$kver" >"$work/initrd.list"
if ! grep -q '/virtio_blk\.ko' "$work/initrd.list"; then
  log "the initramfs has no virtio_blk module"
  exit 1
fi

guest_apt_clean

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
rm -f "$work/initrd.list"
guest_build_finish
