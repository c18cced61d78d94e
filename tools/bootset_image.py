"""Cut a guest's disk down to its boot working set, as a small qcow2.

    .venv/bin/python tools/bootset_image.py DISK.raw BOOT.trace OUT.qcow2 [--cluster 65536] [--zstd]

OUT.qcow2 has DISK's size and, in every ``--cluster``-aligned block that the
trace reads, DISK's exact bytes; everything else is unallocated (reads as
zeros). Replaying the trace against it, or warming a cache from it, returns
the very bytes the real guest read, from a file small enough to share (a
4 GiB sparse raw disk is not). The trace must have been recorded from DISK
itself (tools/record_boot_trace.sh), or the blocks are the wrong ones.

Needs qemu-img. Prints the blocks copied and the sha256 of their bytes, in
block order, so a copy can be checked against the original disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

from bootcache.storm import trace as tracemod


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("disk", help="the guest's raw disk the trace was recorded from")
    ap.add_argument("trace", help="a boot trace file or a shipped trace's name")
    ap.add_argument("out", help="the qcow2 to write")
    ap.add_argument("--cluster", type=int, default=65536,
                    help="block size to copy whole (default: 64 KiB, the cache's cluster)")
    ap.add_argument("--zstd", action="store_true",
                    help="write zstd-compressed clusters (smaller to share; QEMU reads them)")
    args = ap.parse_args(argv)

    tr = tracemod.load_named(args.trace)
    size = os.path.getsize(args.disk)
    if tr.end > size:
        print(f"{args.trace} reads up to {tr.end} but {args.disk} is {size} bytes: "
              "not the disk it was recorded from", file=sys.stderr)
        return 1
    blocks = sorted(tr.blocks(args.cluster))
    digest = hashlib.sha256()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".bootset.", suffix=".raw") as sparse:
        sparse.truncate(size)
        with open(args.disk, "rb") as disk:
            for b in blocks:
                off = b * args.cluster
                data = os.pread(disk.fileno(), min(args.cluster, size - off), off)
                digest.update(data)
                os.pwrite(sparse.fileno(), data, off)
        sparse.flush()
        tmp_out = args.out + ".tmp"
        opts = f"cluster_size={args.cluster}"
        compress = ["-c"] if args.zstd else []
        if args.zstd:
            opts += ",compression_type=zstd"
        subprocess.run(["qemu-img", "convert", "-q", *compress, "-f", "raw", "-O", "qcow2",
                        "-o", opts, sparse.name, tmp_out], check=True)
        os.replace(tmp_out, args.out)
    print(f"{args.out}: {len(blocks)} blocks of {args.cluster} bytes "
          f"({len(blocks) * args.cluster / 2**20:.1f} MiB) from {args.disk}, "
          f"sha256 of their bytes in block order {digest.hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
