"""Acceptance 7: cache fills killed at random moments.

A child process (reader.py random) reads random ranges through the cache,
checking every byte against the base and flushing now and then, and is SIGKILLed at a random moment:
while opening (revalidating, rewriting the header) or while filling. After
every kill qemu-img check must accept the image (0, or 3 for leaked
clusters), and the next child, the final bootcache read and QEMU's own read
must return only the base's bytes. From time to time the cache is started
afresh (so that fills keep happening), QEMU rewrites its header or writes
junk into it (so that the next opener revalidates, and may be killed while
it does).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bootcache

from .conftest import (
    AUTOCLEAR_CACHE,
    CLUSTER,
    QEMU_IMG,
    MiB,
    assert_bytes,
    cached_bytes,
    child_env,
    create_cache,
    header_facts,
    make_base,
    qemu_check,
    qemu_convert_raw,
    qemu_io,
    run,
)

READER = Path(__file__).with_name("reader.py")
RUNS = 60
BUDGET = 50.0  # seconds for the loop; past it, it stops as soon as 50 runs are done


def spawn(cache: Path, base: Path, seed: int, flush: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(READER), "random", str(cache), str(base),
                             str(seed), str(flush)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env())


def wait_ready(proc: subprocess.Popen[bytes], timeout: float = 10) -> bool:
    """True once the child printed "ready"; False if it exited first."""
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    line = proc.stdout.readline()
    while line and line.strip() != b"ready" and time.monotonic() < end:
        line = proc.stdout.readline()
    return line.strip() == b"ready"


@pytest.mark.slow
def test_sigkill_during_fills(tmp_path: Path) -> None:
    crash_loop(tmp_path, quota="100M", policy="stop", runs=RUNS, budget=BUDGET)


def crash_loop(tmp_path: Path, *, quota: str, policy: str, runs: int, budget: float) -> None:
    """SIGKILL ``runs`` children at random moments (at least 50 unless ``runs`` is lower,
    stopping early once ``budget`` seconds have passed)."""
    rng = random.Random(7)
    size = 16 * MiB
    base = make_base(tmp_path / "base.raw", size, seed=71)
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, "base.raw", quota=quota, policy=policy)
    wanted = runs
    lazy = False
    history: list[str] = []
    persisted: list[int] = []
    start = time.monotonic()
    runs = 0
    while runs < wanted and (runs < min(50, wanted) or time.monotonic() - start < budget):
        runs += 1
        seed = rng.randrange(1 << 30)
        when = rng.random()
        # Flushes (as a serving daemon does, at least once a second) commit
        # fills to L2/L1; the child flushes often so that kills land in them.
        proc = spawn(cache, tmp_path / "base.raw", seed, rng.choice([0.05, 0.3, 1.0]))
        try:
            if when < 0.2:
                # Kill it while it opens the cache (maybe revalidating).
                time.sleep(rng.uniform(0.2, 0.6))
                what = "while opening"
            else:
                assert wait_ready(proc), (
                    f"run {runs}: child died before ready: "
                    f"{proc.stderr.read().decode(errors='replace')}")  # type: ignore[union-attr]
                delay = rng.uniform(0, 0.3)
                time.sleep(delay)
                what = f"{delay * 1000:.0f} ms after ready"
            early = proc.poll()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            err = proc.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        persisted.append(cached_bytes(cache))
        history.append(f"run {runs}: seed {seed}, killed {what}, {persisted[-1]} bytes cached")
        assert early is None, f"{history[-1]}: the child exited {early} by itself: {err}"

        code, report = qemu_check(cache)
        assert code in (0, 3) and not report.get("corruptions") \
            and not report.get("check-errors"), (
                f"{history[-1]}: qemu-img check exited {code}: {report}\n" + "\n".join(history))
        trusted = bool(header_facts(cache)["autoclear"] & AUTOCLEAR_CACHE)
        if runs % 6 == 0 and trusted:
            # With bit 63 set, every allocated cluster holds the base's bytes.
            assert_bytes(qemu_convert_raw(cache), base, f"{history[-1]}: QEMU's read")
        if runs % 18 == 9:
            # QEMU rewrites the header: bit 63 is cleared, the next child revalidates.
            lazy = not lazy
            run([QEMU_IMG, "amend", "-f", "qcow2", "-o",
                 f"lazy_refcounts={'on' if lazy else 'off'}", cache])
            history.append("qemu-img amend")
        elif runs % 18 == 0:
            # QEMU writes junk into cached and uncached clusters: the next child
            # must revalidate (even if killed while doing so) before serving.
            offs = sorted(rng.sample(range(size // CLUSTER), 3))
            qemu_io(cache, *(f"write -P 0xa5 {ci * CLUSTER + 512} 4096" for ci in offs))
            history.append(f"qemu-io junk in clusters {offs}")
        elif cached_bytes(cache) >= size * 3 // 4:
            # Mostly warm: start afresh so that the next runs fill again.
            cache.unlink()
            create_cache(cache, "base.raw", quota=quota, policy=policy)
            history.append("new cache")

    assert runs >= min(50, wanted)
    assert max(persisted) > 0, "no fill ever reached the image: the kills came too early"
    with bootcache.open(str(cache)) as img:
        assert_bytes(img.read(0, size), base, "bootcache's final read")
        assert_bytes(img.read(0, size), base, "bootcache's final read, warm")
    code, report = qemu_check(cache)
    assert code in (0, 3), report
    assert_bytes(qemu_convert_raw(cache), base, "QEMU's final read")
