"""Sequential write and read-back of a new qcow2 image: bootcache vs qemu-img vs qemu-io.

In one run, each tool writes SIZE bytes (default 1 GiB) of the same data
sequentially into a new qcow2 image (default options, 64 KiB clusters) and
reads it back:

- bootcache: ``bootcache.create`` + ``bootcache.open(writable=True)``, ``write``
  in CHUNK pieces, ``flush``, ``close``; then ``bootcache.open`` and ``read``
  in CHUNK pieces (every chunk is compared with what was written).
- qemu-img: ``qemu-img convert -f raw -O qcow2 src.raw out.qcow2`` (the raw
  source is made beforehand, untimed); read back with
  ``qemu-img convert -n -O raw out.qcow2 null-co`` (reads every cluster).
- qemu-io: ``write -P 0xa5 OFF CHUNK`` commands (one process, commands on
  stdin), ``flush``; read back with ``read -P 0xa5 OFF CHUNK`` (verifies).

Every timing includes the final flush/close, and all tools go through the
page cache (no O_DIRECT). Each measurement is the best of --repeat runs,
interleaved so that machine drift hits every tool alike.

Usage:
    .venv/bin/python bench/qcow2_seqwrite.py [--size 1G] [--chunk 1M] [--repeat 3]
        [--dir /var/tmp] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PATTERN = 0xA5


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def run(cmd: list[str], stdin: bytes | None = None) -> None:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    if proc.returncode != 0 or b"failed" in proc.stdout.lower():
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{proc.stdout.decode(errors='replace')[-2000:]}\n"
                         f"{proc.stderr.decode(errors='replace')[-2000:]}")


class Bench:
    def __init__(self, workdir: Path, size: int, chunk: int) -> None:
        self.dir = workdir
        self.size = size
        self.chunk = chunk
        self.data = bytes([PATTERN]) * chunk
        self.src = workdir / "src.raw"

    def prepare(self) -> None:
        with open(self.src, "wb") as f:
            for _ in range(self.size // self.chunk):
                f.write(self.data)
            f.write(self.data[: self.size % self.chunk])
            f.flush()
            os.fsync(f.fileno())

    def _fresh(self, name: str) -> Path:
        path = self.dir / name
        path.unlink(missing_ok=True)
        return path

    def _sync(self) -> None:
        os.sync()  # leave no dirty pages of one tool for the next one to pay for

    # -- bootcache

    def bootcache_write(self) -> None:
        import bootcache

        img = self._fresh("bootcache.qcow2")
        bootcache.create(str(img), self.size)
        with bootcache.open(str(img), writable=True) as disk:
            for off in range(0, self.size, self.chunk):
                n = min(self.chunk, self.size - off)
                disk.write(off, self.data if n == self.chunk else self.data[:n])
            disk.flush()

    def bootcache_read(self) -> None:
        import bootcache

        with bootcache.open(str(self.dir / "bootcache.qcow2")) as disk:
            for off in range(0, self.size, self.chunk):
                n = min(self.chunk, self.size - off)
                if disk.read(off, n) != self.data[:n]:
                    raise SystemExit(f"bootcache read back wrong data at {off}")

    # -- qemu-img

    def qemu_img_write(self) -> None:
        out = self._fresh("qemu-img.qcow2")
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(self.src), str(out)])

    def qemu_img_read(self) -> None:
        run(["qemu-img", "convert", "-n", "-f", "qcow2", "--target-image-opts",
             str(self.dir / "qemu-img.qcow2"), f"driver=null-co,size={self.size}"])

    # -- qemu-io

    def _script(self, verb: str) -> bytes:
        lines = [f"{verb} -q -P {PATTERN:#x} {off} {min(self.chunk, self.size - off)}"
                 for off in range(0, self.size, self.chunk)]
        if verb == "write":
            lines.append("flush")
        return ("\n".join(lines) + "\n").encode()

    def qemu_io_write(self) -> None:
        img = self._fresh("qemu-io.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(self.size)])
        run(["qemu-io", "-f", "qcow2", str(img)], stdin=self._script("write"))

    def qemu_io_read(self) -> None:
        run(["qemu-io", "-f", "qcow2", str(self.dir / "qemu-io.qcow2")],
            stdin=self._script("read"))

    def timed(self, fn: Callable[[], None]) -> float:
        self._sync()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="bytes to write (suffixes K M G)")
    parser.add_argument("--chunk", default="1M", help="write/read request size (1M..2M)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args()
    size, chunk = parse_size(args.size), parse_size(args.chunk)
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (install qemu-utils)")

    with tempfile.TemporaryDirectory(prefix="bench-qcow2-", dir=args.dir) as d:
        bench = Bench(Path(d), size, chunk)
        bench.prepare()
        steps: dict[str, Callable[[], None]] = {
            "bootcache write": bench.bootcache_write, "bootcache read": bench.bootcache_read,
            "qemu-img convert write": bench.qemu_img_write,
            "qemu-img convert read": bench.qemu_img_read,
            "qemu-io write": bench.qemu_io_write, "qemu-io read": bench.qemu_io_read,
        }
        best = {name: float("inf") for name in steps}
        for i in range(args.repeat):
            for name, fn in steps.items():
                elapsed = bench.timed(fn)
                best[name] = min(best[name], elapsed)
                print(f"run {i + 1}: {name:24s} {elapsed:7.3f} s", file=sys.stderr)

    mib = size / (1 << 20)
    print(f"sequential {human(size)} in {human(chunk)} requests, new qcow2 image "
          f"(64 KiB clusters), best of {args.repeat}")
    print(f"{'':26s}{'seconds':>9s}{'MiB/s':>9s}")
    for name, t in best.items():
        print(f"{name:26s}{t:9.3f}{mib / t:9.0f}")
    ratios = []
    for op in ("write", "read"):
        ours = best[f"bootcache {op}"]
        for other in ("qemu-img convert", "qemu-io"):
            ratio = ours / best[f"{other} {op}"]
            ratios.append((op, other, ratio))
            print(f"bootcache/{other} {op} time ratio: {ratio:.2f}")
    if args.markdown:
        print()
        print("| step | bootcache s (MiB/s) | qemu-img convert s (MiB/s) | qemu-io s (MiB/s) |")
        print("|---|---|---|---|")
        for op in ("write", "read"):
            cells = [f"{best[f'{t} {op}']:.2f} ({mib / best[f'{t} {op}']:.0f})"
                     for t in ("bootcache", "qemu-img convert", "qemu-io")]
            print(f"| {op} | {' | '.join(cells)} |")
        print()
        for op, other, ratio in ratios:
            print(f"- bootcache / {other} ({op}): {ratio:.2f}x the time")


if __name__ == "__main__":
    main()
