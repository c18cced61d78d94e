#!/usr/bin/env python3
"""Fuzz bootcache's qcow2 reader and writer with mutated images.

Seed images are made by qemu-img / qemu-io (data, zero, compressed clusters;
v2 and v3; extended L2; backing files; several cluster and refcount sizes).
Each case copies a seed and mutates it: header fields, header extension
types and lengths, the backing file name, L1 / L2 / refcount table and block
entries, random bytes in the first clusters, truncation. A worker process
then opens the case with ``bootcache.open`` and reads it (and, for half the
cases, opens it writable and writes, zeroes, discards and flushes).

A case passes when it succeeds or raises a ``BootcacheError`` subclass. It
fails on any other exception, on a hang (per-case timeout), or on a huge
allocation (the worker runs under an address-space limit; MemoryError or a
crash counts as a failure). Failing cases are kept with a description.

With --differential, QEMU is the oracle too: for every case that
``qemu-img check`` finds clean (and small enough), the bytes bootcache reads
must equal those of ``qemu-img convert -O raw`` whenever bootcache opens it.

    tools/fuzz_qcow2.py --seconds 3600 [--seed N] [--out DIR] [--timeout S] [--differential]
    tools/fuzz_qcow2.py --differential --seed 1 --cases 3000 --seconds 1e9 --refused-out DIR
    tools/fuzz_qcow2.py --replay CASE.qcow2        # run one kept case in-process

The CI test (tests/qcow2/test_fuzz.py) runs the same campaign for ~20 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"

MEMORY_LIMIT = 1536 << 20  # address space of the worker
RSS_ALARM = 512 << 20  # a case that makes the worker this big is reported
READ_BUDGET = 4 << 20  # bytes read per case
DIFF_LIMIT = 16 << 20  # differential mode compares disks up to this size with QEMU's view

# --------------------------------------------------------------------------
# seeds


@dataclass
class Seed:
    name: str
    data: bytes
    # Byte offsets of interesting things inside ``data``.
    fields: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset, width)
    ext_headers: list[int] = field(default_factory=list)
    l1_entries: list[int] = field(default_factory=list)
    l2_words: list[int] = field(default_factory=list)
    rt_entries: list[int] = field(default_factory=list)
    rb_ranges: list[tuple[int, int]] = field(default_factory=list)
    cluster_size: int = 65536


HEADER_FIELDS: dict[str, tuple[int, int]] = {
    "magic": (0, 4), "version": (4, 4), "backing_file_offset": (8, 8),
    "backing_file_size": (16, 4), "cluster_bits": (20, 4), "size": (24, 8),
    "crypt_method": (32, 4), "l1_size": (36, 4), "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4), "snapshots_offset": (64, 8),
}
V3_FIELDS: dict[str, tuple[int, int]] = {
    "incompatible_features": (72, 8), "compatible_features": (80, 8),
    "autoclear_features": (88, 8), "refcount_order": (96, 4), "header_length": (100, 4),
    "compression_type": (104, 1),
}


def _u(data: bytes | bytearray, off: int, width: int) -> int:
    return int.from_bytes(data[off:off + width], "big")


def analyse(name: str, data: bytes) -> Seed:
    """Locate the header fields and metadata tables of a valid image."""
    seed = Seed(name, data)
    version = _u(data, 4, 4)
    seed.fields = dict(HEADER_FIELDS)
    if version >= 3:
        seed.fields.update(V3_FIELDS)
    cluster_bits = _u(data, 20, 4)
    cs = 1 << cluster_bits
    seed.cluster_size = cs
    header_len = _u(data, 100, 4) if version >= 3 else 72
    off = header_len
    while off + 8 <= min(len(data), cs):
        seed.ext_headers.append(off)
        etype, elen = _u(data, off, 4), _u(data, off + 4, 4)
        if etype == 0:
            break
        off += 8 + (elen + 7) // 8 * 8
    l1_off, l1_size = _u(data, 40, 8), _u(data, 36, 4)
    for i in range(l1_size):
        seed.l1_entries.append(l1_off + 8 * i)
        l2 = _u(data, l1_off + 8 * i, 8) & 0x00FFFFFFFFFFFE00
        if l2 and l2 + cs <= len(data):
            # Every word: the entries and, with extended L2, the subcluster bitmaps.
            seed.l2_words.extend(range(l2, l2 + cs, 8))
    rt_off, rt_clusters = _u(data, 48, 8), _u(data, 56, 4)
    for i in range(rt_clusters * cs // 8):
        pos = rt_off + 8 * i
        if pos + 8 > len(data):
            break
        rb = _u(data, pos, 8) & ~0x1FF
        if rb:
            seed.rt_entries.append(pos)
            if rb + cs <= len(data):
                seed.rb_ranges.append((rb, cs))
    return seed


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def build_seeds(workdir: Path) -> list[Seed]:
    """Make the seed images (and their backing files) in ``workdir`` with qemu tools."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "base.raw").write_bytes(bytes(range(256)) * 4096 * 2)  # 2 MiB
    specs: list[tuple[str, list[str], list[str]]] = [
        ("v3", ["-o", "cluster_size=65536"],
         ["write -P 0x11 0 100k", "write -z 256k 64k", "write -c -P 0x22 512k 128k",
          "discard 64k 64k"]),
        ("v2-backing", ["-o", "compat=0.10,cluster_size=512", "-b", "base.raw", "-F", "raw"],
         ["write -P 0x33 1000 5000", "write -z 20k 4k", "write -c -P 0x44 64k 2k"]),
        ("extl2-backing", ["-o", "extended_l2=on,cluster_size=32768", "-b", "base.raw",
                           "-F", "raw"],
         ["write -P 0x55 1024 2048", "write -z 40k 8k", "write -P 0x66 100k 40k"]),
        ("zstd-rc1", ["-o", "compression_type=zstd,cluster_size=4096,refcount_bits=1"],
         ["write -P 0x77 0 40k", "write -z -u 8k 4k"]),
        ("rc64-lazy", ["-o", "refcount_bits=64,lazy_refcounts=on,cluster_size=1024"],
         ["write -P 0x88 3000 9000", "write -c -P 0x99 32k 1k", "write -c -P 0x9a 33k 1k"]),
        ("zstd-compressed", ["-o", "compression_type=zstd,cluster_size=16384"],
         ["write -c -P 0xaa 0 16k", "write -c -P 0xab 16k 16k", "write -P 0xac 40000 100"]),
    ]
    seeds = []
    for name, opts, cmds in specs:
        path = workdir / f"seed-{name}.qcow2"
        size = "2M"
        _run([QEMU_IMG, "create", "-q", "-f", "qcow2", *opts, path.name, size], workdir)
        io: list[str] = [QEMU_IO, "-f", "qcow2"]
        for c in cmds:
            io += ["-c", c]
        _run([*io, path.name], workdir)
        seeds.append(analyse(name, path.read_bytes()))
    return seeds


# --------------------------------------------------------------------------
# mutations


def interesting(rng: random.Random, width: int, old: int, file_size: int,
                cluster: int) -> int:
    top = (1 << (8 * width)) - 1
    choices = [0, 1, 2, 7, 8, 9, 0x1FF, 0x200, 0x201, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 55, 1 << 56,
               1 << 62, 1 << 63, top, file_size, file_size - 1, file_size + cluster,
               file_size // cluster * cluster, cluster, 2 * cluster, 3 * cluster,
               old + 1, old - 1, old ^ (1 << rng.randrange(8 * width)), old * 2, old // 2,
               old + cluster, old - cluster, old | (1 << 63), old | (1 << 62),
               rng.randrange(0, top + 1), rng.randrange(0, max(1, file_size))]
    return rng.choice(choices) & top


@dataclass
class Case:
    seed_name: str
    case_seed: int
    write: bool
    mutations: list[str]
    data: bytes


def _put(buf: bytearray, off: int, width: int, value: int) -> None:
    # Wrap as the C field would: mutations stack, so "old + cs" may pass 2**64.
    if off + width <= len(buf):
        buf[off:off + width] = (value % (1 << 8 * width)).to_bytes(width, "big")


def mutate(seed: Seed, case_seed: int) -> Case:
    rng = random.Random(case_seed)
    buf = bytearray(seed.data)
    fsize, cs = len(buf), seed.cluster_size
    notes: list[str] = []

    def header_field() -> None:
        name = rng.choice(sorted(seed.fields))
        off, width = seed.fields[name]
        old = _u(buf, off, width)
        if name.endswith("_features") and rng.random() < 0.6:
            value = old ^ (1 << rng.randrange(64))
        else:
            value = interesting(rng, width, old, fsize, cs)
        _put(buf, off, width, value)
        notes.append(f"header {name}: {old:#x} -> {value:#x}")

    def extension() -> None:
        if not seed.ext_headers:
            return header_field()
        off = rng.choice(seed.ext_headers)
        if rng.random() < 0.5:
            old = _u(buf, off + 4, 4)
            value = interesting(rng, 4, old, fsize, cs)
            _put(buf, off + 4, 4, value)
            notes.append(f"extension at {off:#x} length {old} -> {value:#x}")
        else:
            old = _u(buf, off, 4)
            value = rng.choice([0, 0xE2792ACA, 0x6803F857, 0x0537BE77, 0x44415441,
                                0x23852875, rng.randrange(1 << 32)])
            _put(buf, off, 4, value)
            notes.append(f"extension at {off:#x} type {old:#x} -> {value:#x}")

    def table_entry(kind: str, offsets: list[int]) -> None:
        if not offsets:
            return header_field()
        off = rng.choice(offsets)
        old = _u(buf, off, 8)
        r = rng.random()
        if r < 0.2:  # compressed / zero / copied flags and descriptor bits
            value = old ^ (1 << rng.choice([0, 1, 9, 30, 40, 55, 56, 61, 62, 63]))
        elif r < 0.5:
            value = (1 << 63) | (rng.randrange(0, fsize + 4 * cs) // 512 * 512)
        else:
            value = interesting(rng, 8, old, fsize, cs)
        _put(buf, off, 8, value)
        notes.append(f"{kind} word at {off:#x}: {old:#x} -> {value:#x}")

    def refblock() -> None:
        if not seed.rb_ranges:
            return header_field()
        start, length = rng.choice(seed.rb_ranges)
        pos = start + rng.randrange(0, min(length, 512))
        if pos >= len(buf):
            return truncate()
        old = buf[pos]
        value = rng.choice([0, 1, 0xFF, rng.randrange(256)])
        buf[pos] = value
        notes.append(f"refcount block byte at {pos:#x}: {old:#x} -> {value:#x}")

    def backing_name() -> None:
        off, size = _u(buf, 8, 8), _u(buf, 16, 4)
        if not off or off + size > fsize or size == 0:
            return header_field()
        name = rng.choice([b"base.raw", b"seed-v3.qcow2", b"/etc/passwd", b"../../etc/hosts",
                           b"nonexistent", b"x" * size, b"\x00" * size,
                           b"nbd+unix:///x?socket=/nonexistent",
                           b"http://127.0.0.1:9/x", bytes(rng.randrange(256) for _ in range(size))])
        name = name[:size].ljust(size, b"\x00") if rng.random() < 0.5 else name[:size]
        _put(buf, 16, 4, len(name))
        buf[off:off + len(name)] = name
        notes.append(f"backing name -> {name!r}")

    def random_bytes() -> None:
        limit = min(fsize, rng.choice([512, 4096, 4 * cs]))
        count = rng.randrange(1, 9)
        for _ in range(count):
            pos = rng.randrange(0, limit)
            buf[pos] = rng.randrange(256)
        notes.append(f"{count} random bytes in the first {limit} bytes")

    def truncate() -> None:
        nonlocal fsize
        new = rng.choice([rng.randrange(0, fsize), fsize // 2, cs, cs + 1, 104, 72, fsize - 1])
        del buf[new:]
        fsize = len(buf)
        notes.append(f"truncated to {new}")

    def data_bytes() -> None:
        """Random bytes anywhere past the first cluster: data, tables or blocks."""
        if fsize <= cs:
            return random_bytes()
        count = rng.randrange(1, 17)
        for _ in range(count):
            pos = rng.randrange(cs, fsize)
            buf[pos] = rng.randrange(256)
        notes.append(f"{count} random bytes after the first cluster")

    def virtual_size() -> None:
        old = _u(buf, 24, 8)
        value = max(0, rng.choice([old + 1, old - 1, old + 512, old - 512, old // 2 + 7,
                                   old + cs, old - cs + 3, rng.randrange(0, 16 << 20),
                                   rng.randrange(0, 16 << 11) * 512]))
        _put(buf, 24, 8, value)
        notes.append(f"virtual size {old} -> {value}")

    mutators: list[tuple[float, Callable[[], None]]] = [
        (2, data_bytes), (1, virtual_size),
        (4, header_field), (2, extension), (3, lambda: table_entry("L1", seed.l1_entries)),
        (4, lambda: table_entry("L2", seed.l2_words)),
        (2, lambda: table_entry("refcount table", seed.rt_entries)), (2, refblock),
        (1, backing_name), (3, random_bytes), (0.5, truncate),
    ]
    weights = [w for w, _ in mutators]
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        rng.choices([m for _, m in mutators], weights)[0]()
    return Case(seed.name, case_seed, rng.random() < 0.5, notes, bytes(buf))


# --------------------------------------------------------------------------
# the worker: runs cases in a long-lived process, one JSON line per case


def exercise(path: str, write: bool, case_seed: int, digest: bool = False) -> dict[str, Any]:
    """Open, read, and (when ``write``) write through bootcache. May raise anything.

    With ``digest``, a disk of at most DIFF_LIMIT bytes is read whole first and
    its size and SHA-256 are returned, to compare with what QEMU reads.
    """
    rng = random.Random(case_seed ^ 0x5EED)
    out = read_phase(path, rng, digest)
    if write:
        write_phase(path, rng)
    return out


def fuzz_policy() -> Any:
    """The default backing policy, with remote bases given up on well inside the per-case limit.

    A case may name a remote base that does not answer (``nbd+unix:///x?socket=/gone``);
    the product waits out such an outage for its 30 s deadline by design, which would
    read as a hang here.
    """
    from bootcache.layers.chain import ChainPolicy

    return ChainPolicy(remote_options={"timeout": "1", "deadline": "2"})


def read_phase(path: str, rng: random.Random, digest: bool) -> dict[str, Any]:
    """Open read-only and read (the first part of :func:`exercise`)."""
    import bootcache

    out: dict[str, Any] = {}
    with bootcache.open(path, policy=fuzz_policy()) as img:
        size = img.size
        if digest and size <= DIFF_LIMIT:
            # QEMU sees a qcow2 disk in whole sectors (it rounds the header's size down);
            # that difference is counted apart, so compare the sectors QEMU sees.
            sectors = size // 512 * 512
            h = hashlib.sha256()
            for off in range(0, sectors, 1 << 20):
                h.update(img.read(off, min(1 << 20, sectors - off)))
            out = {"size": size, "sha256": h.hexdigest()}
        budget = READ_BUDGET
        for off in range(0, min(size, 1 << 20), 65536):
            img.read(off, min(65536, size - off))
            budget -= 65536
        while budget > 0 and size > 0:
            off = rng.randrange(0, size)
            n = min(rng.choice([1, 512, 4096, 65536, 300000]), size - off)
            img.read(off, n)
            budget -= max(n, 4096)
        if size:
            img.read(size - 1, 1)
    return out


def write_phase(path: str, rng: random.Random) -> None:
    """Open writable, write, zero, discard and flush (the second part of :func:`exercise`)."""
    import bootcache

    with bootcache.open(path, writable=True, policy=fuzz_policy()) as img:
        size = img.size
        if size == 0:
            return
        for _ in range(6):
            off = rng.randrange(0, size)
            n = min(rng.choice([1, 700, 4096, 65536, 200000]), size - off)
            r = rng.random()
            if r < 0.6:
                img.write(off, rng.randbytes(n))
            elif r < 0.8:
                img.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
            else:
                img.discard(off, n)
            img.read(off, n)
        img.flush()


def worker_main() -> None:
    import resource

    import bootcache  # noqa: F401  (import before the memory limit)
    from bootcache.errors import BootcacheError

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    for line in sys.stdin:
        req = json.loads(line)
        start = time.perf_counter()
        result: dict[str, Any]
        digest: dict[str, Any] = {}
        phase = "read"
        try:
            rng = random.Random(req["case_seed"] ^ 0x5EED)
            digest = read_phase(req["path"], rng, req.get("digest", False))
            if req["write"]:
                phase = "write"
                write_phase(req["path"], rng)
            result = {"status": "ok", "digest": digest}
        except BootcacheError as e:
            # A refusal to write still reports what the read phase saw.
            result = {"status": "error", "type": type(e).__name__, "message": str(e)[:300],
                      "phase": phase, "digest": digest}
        except MemoryError:
            result = {"status": "fail", "type": "MemoryError",
                      "traceback": traceback.format_exc()[-3000:]}
        except BaseException as e:  # everything else is a bug
            result = {"status": "fail", "type": type(e).__name__,
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = time.perf_counter() - start
        result["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class Worker:
    def __init__(self, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.rss = 0

    def run(self, path: str, case: Case, timeout: float, digest: bool = False) -> dict[str, Any]:
        import selectors

        assert self.proc.stdin and self.proc.stdout
        req = {"path": path, "write": case.write, "case_seed": case.case_seed,
               "digest": digest}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
        sel.close()
        if not ready:
            self.close()
            return {"status": "fail", "type": "hang", "traceback": f"no answer in {timeout} s"}
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            err = self.stderr_path.read_text(errors="replace")
            return {"status": "fail", "type": "worker died",
                    "traceback": f"exit {self.proc.returncode}: {err[-3000:]}"}
        result: dict[str, Any] = json.loads(line)
        if result.get("maxrss", 0) > RSS_ALARM and self.rss <= RSS_ALARM:
            result = {"status": "fail", "type": "huge memory",
                      "traceback": f"worker grew to {result['maxrss'] >> 20} MiB"}
        self.rss = max(self.rss, result.get("maxrss", 0))
        return result

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for s in (self.proc.stdin, self.proc.stdout):
            if s:
                s.close()


# --------------------------------------------------------------------------
# QEMU as the oracle (differential mode)


def qemu_view(path: Path) -> dict[str, Any] | None:
    """Size and SHA-256 of the disk as QEMU reads it, when ``qemu-img check`` finds the
    image clean and it is small; else None (QEMU is no oracle for it)."""
    try:
        check = subprocess.run([QEMU_IMG, "check", "-f", "qcow2", str(path)],
                               capture_output=True, timeout=10, check=False)
        if check.returncode != 0:
            return None
        info = subprocess.run([QEMU_IMG, "info", "-f", "qcow2", "--output", "json", str(path)],
                              capture_output=True, timeout=10, check=False)
        if info.returncode != 0:
            return None
        size = json.loads(info.stdout)["virtual-size"]
        if size > DIFF_LIMIT:
            return None
        raw = path.with_suffix(".raw")
        conv = subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", str(path),
                               str(raw)], capture_output=True, timeout=20, check=False)
        if conv.returncode != 0:
            return None
        data = raw.read_bytes()
        raw.unlink()
        return {"size": size, "sha256": hashlib.sha256(data).hexdigest()}
    except (subprocess.TimeoutExpired, OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# campaigns


@dataclass
class Report:
    cases: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    compared: int = 0  # differential mode: cases both QEMU and bootcache read
    refused_clean: list[dict[str, Any]] = field(default_factory=list)  # QEMU: clean (first 50)
    refused_clean_count: int = 0  # all of them
    refused_clean_writes: int = 0  # of which read fine (same bytes as QEMU) but refused writes
    size_mismatches: int = 0  # header size not a multiple of 512: QEMU rounds it down

    def summary(self) -> str:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))
        diff = (f", {self.compared} compared with QEMU ({self.size_mismatches} with a size "
                f"QEMU rounds down), {self.refused_clean_count} refused although qemu-img check "
                f"finds them clean ({self.refused_clean_writes} of them read, refused "
                "writes)") if self.compared or self.refused_clean_count else ""
        return (f"{self.cases} cases: {self.ok} ok, {sum(self.errors.values())} refused "
                f"({errs}){diff}, {len(self.failures)} failures")


def campaign(seconds: float, workdir: Path, *, seed: int = 0, timeout: float = 10.0,
             out: Path | None = None, max_failures: int = 20, differential: bool = False,
             log: Callable[[str], None] | None = None, cases: int | None = None,
             refused_out: Path | None = None) -> Report:
    """Run cases until ``seconds`` pass (or ``cases`` cases ran); keep failing cases in
    ``out`` (if given).

    ``differential``: also read each case with QEMU; where ``qemu-img check`` finds
    it clean and bootcache opens it, both must read the same bytes. Cases bootcache
    refuses although QEMU finds them clean are counted; with ``refused_out`` they are
    kept there (image and description) to be classified."""
    seeds = build_seeds(workdir)
    report = Report()
    err_path = workdir / "worker.err"
    worker = Worker(err_path)
    deadline = time.monotonic() + seconds
    case_path = workdir / "case.qcow2"
    try:
        index = 0
        while (time.monotonic() < deadline and len(report.failures) < max_failures
               and (cases is None or report.cases < cases)):
            case_seed = seed * 1_000_003 + index
            index += 1
            source = seeds[case_seed % len(seeds)]
            case = mutate(source, case_seed)
            case_path.write_bytes(case.data)
            if not worker.alive():
                worker.close()
                worker = Worker(err_path)
            theirs = qemu_view(case_path) if differential else None
            result = worker.run(str(case_path), case, timeout, digest=theirs is not None)
            report.cases += 1
            status = result["status"]
            ours = result.get("digest") or None
            write_refused = status == "error" and result.get("phase") == "write"
            if (status == "ok" or write_refused) and theirs is not None and ours is not None:
                report.compared += 1
                if ours["size"] != theirs["size"]:
                    report.size_mismatches += 1
                    ours = {**ours, "size": ours["size"] // 512 * 512}
                if ours != theirs:
                    status = "fail"
                    result = {"status": "fail", "type": "differs from QEMU",
                              "traceback": f"qemu-img reads {theirs}, bootcache reads {ours}"}
                elif case.write and not write_refused:
                    # The image was clean before bootcache wrote into it; it must stay so.
                    after = subprocess.run([QEMU_IMG, "check", "-f", "qcow2", str(case_path)],
                                           capture_output=True, timeout=20, check=False)
                    if after.returncode not in (0, 3):
                        status = "fail"
                        result = {"status": "fail", "type": "writes corrupted a clean image",
                                  "traceback": (after.stdout + after.stderr).decode()[-3000:]}
            if status == "ok":
                report.ok += 1
            elif status == "error":
                report.errors[result["type"]] = report.errors.get(result["type"], 0) + 1
                if theirs is not None:
                    report.refused_clean_count += 1
                    report.refused_clean_writes += write_refused
                    refused = {"case_seed": case_seed, "seed": source.name,
                               "mutations": case.mutations, "phase": result.get("phase"),
                               "error": f"{result['type']}: {result.get('message', '')}"}
                    if len(report.refused_clean) < 50:
                        report.refused_clean.append(refused)
                    if refused_out is not None:
                        refused_out.mkdir(parents=True, exist_ok=True)
                        (refused_out / f"case-{case_seed}.qcow2").write_bytes(case.data)
                        (refused_out / f"case-{case_seed}.json").write_text(
                            json.dumps(refused, indent=1))
            else:
                failure = {"seed": source.name, "case_seed": case_seed, "write": case.write,
                           "mutations": case.mutations, "type": result["type"],
                           "traceback": result.get("traceback", "")}
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    kept = out / f"case-{case_seed}.qcow2"
                    kept.write_bytes(case.data)
                    for extra in [*workdir.glob("base*"), *workdir.glob("seed-*")]:
                        shutil.copy(extra, out / extra.name)
                    (out / f"case-{case_seed}.json").write_text(json.dumps(failure, indent=1))
                    failure["kept"] = str(kept)
                report.failures.append(failure)
                if log:
                    log(f"FAIL {failure['type']} case {case_seed} ({source.name}, "
                        f"write={case.write}): {case.mutations}")
                if not worker.alive():
                    worker.close()
                    worker = Worker(err_path)
            if log and report.cases % 500 == 0:
                log(report.summary())
    finally:
        worker.close()
    return report


def replay(path: Path) -> None:
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    print(json.dumps(meta, indent=1))
    exercise(str(path), bool(meta.get("write", True)), int(meta.get("case_seed", 0)))
    print("no exception")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="time budget")
    parser.add_argument("--cases", type=int, default=None,
                        help="stop after this many cases (with --seed: a repeatable run)")
    parser.add_argument("--refused-out", type=Path, default=None,
                        help="differential mode: keep the cases bootcache refuses although "
                        "qemu-img check finds them clean here")
    parser.add_argument("--seed", type=int, default=None, help="campaign seed (default random)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-case timeout (s)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"),
                        help="where failing cases are kept")
    parser.add_argument("--differential", action="store_true",
                        help="compare with QEMU's reading where qemu-img check finds no error")
    parser.add_argument("--replay", type=Path, help="run one kept case in this process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main()
    if args.replay:
        return replay(args.replay)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"campaign seed {seed}, {args.seconds:.0f} s, failures kept in {args.out}")
    with tempfile.TemporaryDirectory(prefix="fuzz-qcow2-") as d:
        report = campaign(args.seconds, Path(d), seed=seed, timeout=args.timeout,
                          out=args.out, max_failures=1000, differential=args.differential,
                          log=print, cases=args.cases, refused_out=args.refused_out)
    print(report.summary())
    for r in report.refused_clean[:20]:
        print(f"refused clean case {r['case_seed']} ({r['seed']}): {r['error']} {r['mutations']}")
    for f in report.failures[:20]:
        print(f"--- {f['type']} case {f['case_seed']} ({f['seed']}): {f['mutations']}")
        print(f["traceback"])
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
