"""Acceptance 4: SIGKILL a writer at random moments; nothing flushed is lost.

A writer process (crash_writer.py) runs a reproducible stream of writes and
write-zeroes through bootcache, flushing after every batch and logging
(fsynced) what each flush covered. The test kills it at a random moment,
then: ``qemu-img check`` finds no corruption (leaked clusters are allowed),
every byte the last logged flush covered reads back, and bytes that later,
unflushed operations touched hold either the flushed value or a value one
of those operations wrote. Each image takes several kills in a row, so
bootcache also reopens images left behind by a crash.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pytest

import bootcache

from .conftest import (
    KiB,
    MiB,
    assert_same_bytes,
    bootcache_read_all,
    qemu_img_check,
    qemu_img_create,
    qemu_raw_bytes,
    run_qemu_io,
)
from .crash_writer import op_stream

WRITER = Path(__file__).with_name("crash_writer.py")


@dataclass(frozen=True)
class CrashCase:
    name: str
    size: int
    cluster_size: int
    compat: str = "1.1"
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    backing_fmt: str | None = None
    runs: int = 9

    @property
    def discards(self) -> bool:
        """Discard whole clusters too, where the contract says they then read as zeros."""
        return self.backing_fmt is None or self.compat == "1.1"


CASES = [
    CrashCase("cs64k", 16 * MiB, 65536),
    CrashCase("cs512-backing-raw", 4 * MiB, 512, backing_fmt="raw"),
    CrashCase("cs4k-v2-backing-qcow2", 8 * MiB, 4096, compat="0.10", backing_fmt="qcow2"),
    CrashCase("cs16k-rc1", 8 * MiB, 16384, refcount_bits=1),
    CrashCase("cs1k-rc64-backing-qcow2", 4 * MiB, 1024, refcount_bits=64, backing_fmt="qcow2"),
    CrashCase("cs2k-v2", 4 * MiB, 2048, compat="0.10", runs=6),
    # One refcount table cluster covers only 2 MiB of file here: kills land while the
    # refcount table grows.
    CrashCase("cs512-rc64-growth", 8 * MiB, 512, refcount_bits=64, runs=8),
    CrashCase("cs64k-lazy-backing", 8 * MiB, 65536, lazy_refcounts=True, backing_fmt="raw",
              runs=6),
]
# For longer hunts: BOOTCACHE_CRASH_SEED=x BOOTCACHE_CRASH_RUNS=200 pytest tests/qcow2/test_crash.py
SEED = os.environ.get("BOOTCACHE_CRASH_SEED", "")
RUNS = int(os.environ.get("BOOTCACHE_CRASH_RUNS", "0"))


def _parse_log(log: Path) -> tuple[int, int | None]:
    """(ops covered by the last completed flush, first op of the last batch begun)."""
    flushed, begun = 0, None
    for line in log.read_text().splitlines():
        if line.startswith("F "):
            flushed = int(line[2:])
        elif line.startswith("B "):
            begun = int(line[2:])
    return flushed, begun


def _verify(actual: bytes, before: bytes, seed: int, cluster: int, discards: bool, batch: int,
            flushed: int, begun: int | None, what: str) -> None:
    size = len(before)
    stream = op_stream(seed, size, cluster, discards)
    model = bytearray(before)
    for _kind, off, data in islice(stream, flushed):
        model[off:off + len(data)] = data
    # Operations that may or may not have reached the image before the kill.
    last = flushed if begun is None else max(begun, flushed)
    pending = list(islice(stream, last + batch - flushed))
    if actual == model:
        return
    for start in range(0, size, 4096):
        end = min(size, start + 4096)
        if actual[start:end] == model[start:end]:
            continue
        covering = [(off, data) for _k, off, data in pending
                    if off < end and off + len(data) > start]
        for i in range(start, end):
            if actual[i] == model[i]:
                continue
            if any(off <= i < off + len(data) and data[i - off] == actual[i]
                   for off, data in covering):
                continue
            over = [(o, len(d)) for o, d in covering if o <= i < o + len(d)]
            raise AssertionError(
                f"{what}: byte {i:#x} is {actual[i]:#04x}; flushed value {model[i]:#04x} "
                f"(flushed ops {flushed}, pending ops {len(pending)}, "
                f"pending writes over it: {over})")


def _wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_bytes().startswith(b"ready"):
            return
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"writer exited with {proc.returncode} before ready: {err}")
        time.sleep(0.005)
    raise AssertionError("writer never became ready")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sigkill_during_writes(tmp_path: Path, case: CrashCase) -> None:
    rng = random.Random(SEED + case.name)
    img = tmp_path / "img.qcow2"
    backing_name = None
    if case.backing_fmt:
        base = tmp_path / f"base.{case.backing_fmt}"
        qemu_img_create(base, case.size, fmt=case.backing_fmt)
        run_qemu_io(base, [f"write -q -P 0x{i % 200 + 20:x} {i * 96 * KiB} {80 * KiB}"
                           for i in range(case.size // (96 * KiB))], fmt=case.backing_fmt)
        backing_name = base.name
    bootcache.create(str(img), case.size, cluster_size=case.cluster_size, compat=case.compat,
                     refcount_bits=case.refcount_bits, lazy_refcounts=case.lazy_refcounts,
                     backing_file=backing_name, backing_fmt=case.backing_fmt)
    before = qemu_raw_bytes(img)
    histories = []
    for run in range(RUNS or case.runs):
        seed = rng.randrange(2**32)
        batch = rng.choice([1, 2, 3, 5, 8, 13])
        log = tmp_path / f"run{run}.log"
        proc = subprocess.Popen(
            [sys.executable, WRITER, img, log, str(seed), str(batch), str(case.cluster_size),
             "1" if case.discards else "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_ready(log, proc)
            time.sleep(rng.choice([0.0, 0.001, 0.01]) + rng.random() * 0.25)
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"writer died on its own ({proc.returncode}): {err}")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        flushed, begun = _parse_log(log)
        histories.append((run, seed, batch, flushed, begun))
        what = f"{case.name} run {run} (seed {seed}, batch {batch}; history {histories})"

        if case.lazy_refcounts and int.from_bytes(img.read_bytes()[72:80], "big") & 1:
            # Dirty with lazy refcounts: stale refcounts are expected until a writer
            # opens it, which must repair them.
            with bootcache.open(str(img), writable=True):
                pass
        check = qemu_img_check(img)
        assert check["exit-code"] in (0, 3), f"{what}: qemu-img check: {check}"
        assert check.get("corruptions", 0) == 0, f"{what}: {check}"
        assert check.get("check-errors", 0) == 0, f"{what}: {check}"

        actual = qemu_raw_bytes(img)
        _verify(actual, before, seed, case.cluster_size, case.discards, batch, flushed, begun,
                what)
        assert_same_bytes(bootcache_read_all(img), actual, f"{what}: bootcache vs qemu")
        before = actual
    # Some runs must have got real work done, or the test proves nothing.
    assert sum(h[3] for h in histories) > 0, histories
