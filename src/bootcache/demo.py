"""The README's main job: a small end-to-end run on a fresh machine.

It creates a base image, a qcow2 overlay over it, writes through bootcache,
and shows ``info`` and ``check`` results, verified by qemu-img when present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import bootcache


def main(workdir: str) -> int:
    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(workdir, "base.raw")
    overlay = os.path.join(workdir, "vm1.qcow2")
    with open(base, "wb") as f:
        f.write(os.urandom(4 << 20))
    bootcache.create(overlay, 4 << 20, backing_file="base.raw", backing_fmt="raw")
    with bootcache.open(overlay, writable=True) as img:
        img.write(4096, b"written through bootcache")
        assert img.read(4096, 25) == b"written through bootcache"
        assert img.read(0, 4096) == open(base, "rb").read(4096)
    bc = [sys.executable, "-m", "bootcache"]
    subprocess.run([*bc, "info", overlay], check=True)
    subprocess.run([*bc, "check", overlay], check=True)
    if shutil.which("qemu-img"):
        print("\nqemu-img agrees:")
        subprocess.run(["qemu-img", "check", overlay], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bootcache-demo"))
