# Shared steps of the test guests' builds (tests/e2e/build_guest.sh,
# tools/build_services_guest.sh); sourced, not run. The caller sets
# GUEST_VERSION, CACHE, MIRROR, SUITE and BUILD_NAME first, then calls:
#
#   guest_build_begin TOOL...       print $OUT and exit if it is built; else
#                                   check root and TOOLs, take the lock, clear
#                                   interrupted builds, make $work and $rootfs
#   guest_debootstrap PACKAGES      minbase plus PACKAGES (comma-separated)
#   guest_initramfs_modules         virtio_blk and ext4 in the initramfs
#   guest_poweroff_unit DESC MARKER no getty; power off once the boot settles
#   guest_update_initramfs          rebuild it; sets $kver
#   guest_apt_clean                 drop apt's caches from the root
#   guest_build_finish              rename $work to $OUT and print it
#
# A build happens in a temporary directory beside $OUT, under a lock, and is
# renamed into place at the very end: an interrupted build never leaves a half
# guest, and concurrent runs build it once.

log() { echo "$BUILD_NAME: $*" >&2; }

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

guest_build_begin() {
  OUT=$CACHE/$GUEST_VERSION
  if [ -f "$OUT/manifest.txt" ]; then
    echo "$OUT"
    exit 0
  fi
  if [ "$(id -u)" != 0 ]; then
    log "needs root (debootstrap and chroot); $OUT does not exist yet"
    exit 77
  fi
  local tool
  for tool in debootstrap mkfs.ext4 chroot flock "$@"; do
    command -v "$tool" >/dev/null || { log "$tool not found"; exit 77; }
  done

  mkdir -p "$CACHE"
  exec 9>"$CACHE/.$GUEST_VERSION.lock"
  flock 9
  if [ -f "$OUT/manifest.txt" ]; then  # built by another run while we waited
    echo "$OUT"
    exit 0
  fi
  local stale
  for stale in "$CACHE/.$GUEST_VERSION.build."*; do  # we hold the lock
    [ -e "$stale" ] || continue
    log "removing the interrupted build $stale"
    remove_build "$stale"
  done

  start=$(date +%s)
  work=$(mktemp -d "$CACHE/.$GUEST_VERSION.build.XXXXXX")
  trap 'remove_build "$work"' EXIT
  rootfs=$work/rootfs
}

guest_debootstrap() {
  log "debootstrap $SUITE from $MIRROR into $rootfs"
  debootstrap --variant=minbase --include="$1" \
    "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
    tail -n 40 "$work/debootstrap.log" >&2
    log "debootstrap failed"
    exit 1
  }
  unmount_below "$rootfs"
}

# The Debian initramfs with MODULES=most carries virtio_blk; make it explicit.
guest_initramfs_modules() {
  mkdir -p "$rootfs/etc/initramfs-tools/conf.d"
  echo MODULES=most >"$rootfs/etc/initramfs-tools/conf.d/bootcache.conf"
  printf 'virtio_pci\nvirtio_blk\next4\n' >>"$rootfs/etc/initramfs-tools/modules"
}

# Boots must read the same blocks every time (a second boot reads nothing the
# first did not): no login prompt racing with the poweroff (systemd's getty
# generator would start one on ttyS0), and the poweroff waits for the job
# queue to drain, so shutdown always starts from a quiet system. The unit is
# Type=simple: a oneshot would itself keep the queue busy. The marker line on
# the console tells the host the boot is done.
guest_poweroff_unit() {
  local description=$1 marker=$2
  ln -sf /dev/null "$rootfs/etc/systemd/system/getty.target"
  ln -sf /dev/null "$rootfs/etc/systemd/system/serial-getty@ttyS0.service"
  cat >"$rootfs/etc/systemd/system/bootcache-poweroff.service" <<EOF
[Unit]
Description=$description
After=multi-user.target

[Service]
Type=simple
ExecStart=/bin/sh -c 'systemctl is-system-running --wait >/dev/null; echo "$marker" >/dev/console; exec systemctl --no-block poweroff'

[Install]
WantedBy=multi-user.target
EOF
  mkdir -p "$rootfs/etc/systemd/system/multi-user.target.wants"
  ln -sf ../bootcache-poweroff.service \
    "$rootfs/etc/systemd/system/multi-user.target.wants/bootcache-poweroff.service"
}

guest_update_initramfs() {
  kver=$(basename "$(ls -d "$rootfs"/lib/modules/*/ | head -n 1)")
  log "rebuilding the initramfs of $kver"
  chroot "$rootfs" update-initramfs -u -k "$kver" >"$work/initramfs.log" 2>&1 || {
    cat "$work/initramfs.log" >&2
    exit 1
  }
  unmount_below "$rootfs"
}

guest_apt_clean() {
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
}

guest_build_finish() {
  rm -f "$work"/*.log
  chmod 755 "$work"
  mv -T "$work" "$OUT"
  trap - EXIT
  log "built $OUT in $(($(date +%s) - start)) s"
  echo "$OUT"
}
