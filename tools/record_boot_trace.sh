#!/usr/bin/env bash
# Records a boot trace of one of the project's Debian guests with
# `bootcache trace record`, as /work/shared/traces/README.md describes:
#
#   bootcache trace record -o raw.trace DISK=root  (the base, every read logged)
#   overlay.qcow2 (4 KiB clusters), backing nbd+unix:///root -> qemu-system-x86_64
#
# The guest powers itself off once its boot has settled, which ends the
# recording. Every read that reached the base is in the trace (guest writes
# stay in the overlay; its 4 KiB clusters match ext4's blocks, so no
# copy-on-write read of a partly written cluster reaches the base).
#
#   tools/record_boot_trace.sh services OUT.trace   GRUB from a partitioned disk,
#                                                   ssh/cron/networking/journal
#                                                   (tools/build_services_guest.sh)
#   tools/record_boot_trace.sh minbase OUT.trace    the e2e guest, -kernel/-initrd
#                                                   (tests/e2e/build_guest.sh)
#   BOOTCACHE=path/to/bootcache ...                 the CLI (default .venv/bin/bootcache)
#   KEEP=DIR ...                                    keep the console log and overlay in DIR
#
# Builds the guest first if it is not cached yet (root, network to a Debian
# mirror). QEMU runs under TCG, 1 vCPU, 512 MiB, like the first trace.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
kind=${1:?usage: $0 services|minbase OUT.trace}
out=${2:?usage: $0 services|minbase OUT.trace}
bootcache=${BOOTCACHE:-$here/.venv/bin/bootcache}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-1200}

log() { echo "record_boot_trace: $*" >&2; }

qemu_boot=()
case $kind in
  services)
    guest=$(bash "$here/tools/build_services_guest.sh" | tail -n 1)
    disk=$guest/disk.raw
    # SeaBIOS boots the disk's own GRUB; a user-mode NIC, restricted so the
    # guest reaches nothing but QEMU's own DHCP server.
    qemu_boot=(-nic "user,model=virtio-net-pci,restrict=on")
    what="Debian 12 services guest ($(grep '^version=' "$guest/manifest.txt" | cut -d= -f2)): GRUB from an MBR disk, ssh, cron, ifupdown DHCP, persistent journal"
    ;;
  minbase)
    guest=$(bash "$here/tests/e2e/build_guest.sh" | tail -n 1)
    disk=$guest/root.raw
    qemu_boot=(-kernel "$guest/vmlinuz" -initrd "$guest/initrd.img"
               -append "root=/dev/vda rw console=ttyS0 panic=-1")
    what="Debian 12 minbase e2e guest ($(grep '^version=' "$guest/manifest.txt" | cut -d= -f2)): -kernel/-initrd, root=/dev/vda"
    ;;
  *) log "unknown guest kind $kind (services or minbase)"; exit 2 ;;
esac
marker=$(grep '^marker=' "$guest/manifest.txt" | cut -d= -f2-)

work=$(mktemp -d /tmp/bcrec.XXXXXX)  # short: a UNIX socket path lives here
rec_pid=
cleanup() {
  if [ -n "$rec_pid" ] && kill -0 "$rec_pid" 2>/dev/null; then
    kill -TERM "$rec_pid"; wait "$rec_pid" || true
  fi
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP" && cp "$work"/console.log "$work"/record.log "$KEEP"/ 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

sock=$work/rec.sock
"$bootcache" trace record --socket "$sock" -o "$work/raw.trace" "$disk=root" \
  2>"$work/record.log" &
rec_pid=$!
for _ in $(seq 600); do
  [ -S "$sock" ] && break
  kill -0 "$rec_pid" 2>/dev/null || { cat "$work/record.log" >&2; exit 1; }
  sleep 0.1
done
[ -S "$sock" ] || { log "the recorder did not listen on $sock"; exit 1; }

size=$(stat -c %s "$disk")
# -u: do not open the backing now, so the trace starts with the guest's first read.
qemu-img create -q -f qcow2 -o cluster_size=4096 -u \
  -b "nbd+unix:///root?socket=$sock" -F raw "$work/overlay.qcow2" "$size"

log "booting $kind from $disk (TCG; a few minutes)"
start=$(date +%s)
timeout "$BOOT_TIMEOUT" qemu-system-x86_64 -accel tcg -m 512 -smp 1 \
  -nodefaults -display none -monitor none -no-reboot \
  -serial "file:$work/console.log" \
  -drive "file=$work/overlay.qcow2,if=virtio,format=qcow2" \
  "${qemu_boot[@]}" || { log "qemu failed or timed out"; tail -n 40 "$work/console.log" >&2; exit 1; }
boot_s=$(($(date +%s) - start))
kill -TERM "$rec_pid"; wait "$rec_pid"; rec_pid=

grep -q "Reached target .*multi-user" "$work/console.log" ||
  { log "multi-user.target not reached"; tail -n 40 "$work/console.log" >&2; exit 1; }
grep -qF "$marker" "$work/console.log" ||
  { log "the poweroff unit did not run"; tail -n 40 "$work/console.log" >&2; exit 1; }

{
  echo "# time_s offset length  (reads of one boot: $what; QEMU $(qemu-system-x86_64 --version | head -n 1 | awk '{print $4}') virtio-blk, TCG, 1 vCPU, 512 MiB; boot ${boot_s} s wall)"
  grep -v '^#' "$work/raw.trace"
} >"$out.tmp"
mv "$out.tmp" "$out"
log "wrote $out (boot took ${boot_s} s)"
"$bootcache" trace stats "$out"
