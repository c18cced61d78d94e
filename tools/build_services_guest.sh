#!/usr/bin/env bash
# Builds (once) a second Debian 12 guest that boots a different way from the
# e2e guest (tests/e2e/build_guest.sh), for a second boot trace:
#
# - a partitioned disk (MBR, one ext4 partition from 1 MiB) that boots through
#   its own GRUB from the BIOS, so the kernel and initrd are read from the disk
#   too (the e2e guest is booted with -kernel/-initrd);
# - more of a server's services: openssh-server, cron, ifupdown networking with
#   DHCP on a virtio NIC, dbus, a persistent journal on disk;
# - root=UUID=... net.ifnames=0, mounted read-only by the initramfs and remounted rw by
#   systemd (the e2e guest: root=/dev/vda rw).
#
# As in the e2e guest, a unit powers the guest off once the boot has settled
# (systemctl is-system-running --wait), no getty starts, and the disk is built
# with no loop device or mount: mkfs.ext4 -d fills the partition in place, and
# GRUB's boot sector and core image are written with dd where grub-install
# would put them.
#
#   tools/build_services_guest.sh          build if missing, print the guest dir
#   BOOTCACHE_GUEST_CACHE=DIR ...          cache root (default /var/cache/bootcache-tests)
#   BOOTCACHE_DEBIAN_MIRROR=URL ...        mirror (default http://deb.debian.org/debian)
#
# The guest lands in $CACHE/$GUEST_VERSION/ with disk.raw and manifest.txt.
# Bump GUEST_VERSION whenever the recipe changes. Needs root (debootstrap,
# chroot) and sfdisk (fdisk) on the host; GRUB comes from the guest itself.
set -euo pipefail

GUEST_VERSION=services-guest-v1
CACHE=${BOOTCACHE_GUEST_CACHE:-/var/cache/bootcache-tests}
MIRROR=${BOOTCACHE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DISK_SIZE_MIB=4096
PART_START_MIB=1
BUILD_NAME=build_services_guest
MARKER="bootcache-trace: boot settled, powering off"
PACKAGES=linux-image-amd64,systemd-sysv,udev,openssh-server,cron,ifupdown,isc-dhcp-client,dbus,grub-pc-bin

# shellcheck source=guest_build_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/guest_build_lib.sh"

guest_build_begin sfdisk  # sfdisk: apt-get install fdisk
guest_debootstrap "$PACKAGES"

log "configuring the guest"
uuid=$(cat /proc/sys/kernel/random/uuid)
echo bootcache-services >"$rootfs/etc/hostname"
printf 'UUID=%s / ext4 rw,errors=remount-ro 0 1\n' "$uuid" >"$rootfs/etc/fstab"
ln -sf /lib/systemd/system/multi-user.target "$rootfs/etc/systemd/system/default.target"
guest_initramfs_modules

# Networking: the classic ifupdown + dhclient on QEMU's virtio NIC, named
# eth0 (net.ifnames=0 on the kernel command line) whatever its PCI slot.
cat >"$rootfs/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF
# A persistent journal: journald flushes /run/log/journal to disk at boot.
mkdir -p "$rootfs/var/log/journal" "$rootfs/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=persistent\n' >"$rootfs/etc/systemd/journald.conf.d/persistent.conf"

guest_poweroff_unit "Power off as soon as the boot has settled (bootcache trace)" "$MARKER"
# Timers that would fire at boot and reach for the network or churn the disk.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done

guest_update_initramfs

# GRUB, as grub-install would lay it out for a BIOS boot from an MBR disk:
# modules under /boot/grub/i386-pc, boot.img in the MBR, core.img in the gap
# before the first partition (its first sector's blocklist already points at
# sector 2, where the rest of core.img follows).
log "installing GRUB"
mkdir -p "$rootfs/boot/grub/i386-pc"
cp "$rootfs"/usr/lib/grub/i386-pc/*.mod "$rootfs"/usr/lib/grub/i386-pc/*.lst "$rootfs/boot/grub/i386-pc/"
cat >"$rootfs/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
set default=0
menuentry "Debian 12 (bootcache services guest)" {
  insmod part_msdos
  insmod ext2
  search --no-floppy --fs-uuid --set=root $uuid
  linux /boot/vmlinuz-$kver root=UUID=$uuid ro net.ifnames=0 console=ttyS0 panic=-1
  initrd /boot/initrd.img-$kver
}
EOF
# The guest's own GRUB (grub-pc-bin) makes the core image.
chroot "$rootfs" grub-mkimage -O i386-pc -o /core.img -p "(hd0,msdos1)/boot/grub" \
  biosdisk part_msdos ext2
mv "$rootfs/core.img" "$work/core.img"
cp "$rootfs/usr/lib/grub/i386-pc/boot.img" "$work/boot.img"
core_sectors=$(( ($(stat -c %s "$work/core.img") + 511) / 512 ))
if [ $((core_sectors + 1)) -ge $((PART_START_MIB * 2048)) ]; then
  log "core.img ($core_sectors sectors) does not fit before the partition"
  exit 1
fi

guest_apt_clean

log "making the ${DISK_SIZE_MIB} MiB disk"
truncate -s "${DISK_SIZE_MIB}M" "$work/disk.raw"
echo "start=$((PART_START_MIB * 2048)), type=83, bootable" |
  sfdisk -q --label dos "$work/disk.raw" >/dev/null
part_bytes=$(( (DISK_SIZE_MIB - PART_START_MIB) * 1048576 ))
mkfs.ext4 -q -F -L root -U "$uuid" -E "offset=$((PART_START_MIB * 1048576)),lazy_itable_init=0,lazy_journal_init=0" \
  -d "$rootfs" "$work/disk.raw" "$((part_bytes / 1024))k"
# boot.img's first 440 bytes (the partition table after them stays), then core.img.
dd if="$work/boot.img" of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$work/disk.raw" bs=512 seek=1 conv=notrunc status=none
remove_build "$rootfs"

cat >"$work/manifest.txt" <<EOF
version=$GUEST_VERSION
suite=$SUITE
mirror=$MIRROR
packages=$PACKAGES
kernel=$kver
disk_size_mib=$DISK_SIZE_MIB
root_uuid=$uuid
marker=$MARKER
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$(($(date +%s) - start))
EOF
rm -f "$work/core.img" "$work/boot.img"
guest_build_finish
