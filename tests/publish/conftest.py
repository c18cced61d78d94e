"""Published caches: helpers shared by the publish/pull tests.

Servers come from the other suites' fixtures (nginx and SeaweedFS from
tests/sources, nbdkit with its log filter from tests/cache), so the tests
here run against the same real peers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cache.conftest import (  # noqa: F401  (fixtures re-exported for this package)
    CLUSTER,
    QEMU_IMG,
    MiB,
    bootcache,
    child_env,
    rng,
    run,
    sockdir,
    wait_for,
)
from sources.conftest import nginx, weed, weed_session  # noqa: F401

# A boot-like working set: scattered runs of clusters, some read twice.
TRACE_RUNS = [(0, 3), (17, 2), (40, 9), (41, 1), (100, 30), (300, 4), (511, 1)]


def write_trace(path: Path, runs: list[tuple[int, int]] = TRACE_RUNS) -> list[tuple[int, int]]:
    """A boot trace (time offset length) reading ``runs`` of clusters, in 4 KiB reads."""
    reads = [(c * CLUSTER + k * 4096, 4096) for first, n in runs
             for c in range(first, first + n) for k in range(0, CLUSTER // 4096, 3)]
    path.write_text("".join(f"{i * 0.0001:.4f} {off} {n}\n" for i, (off, n) in enumerate(reads)))
    return reads


def warm(cache: Path, reads: list[tuple[int, int]]) -> None:
    """Read through the cache (the Python API: copy-on-read stores what it misses)."""
    code = ("import bootcache, sys, json\n"
            "with bootcache.open(sys.argv[1]) as img:\n"
            "    for off, n in json.loads(sys.argv[2]):\n"
            "        img.read(off, n)\n")
    import json

    run([sys.executable, "-c", code, cache, json.dumps(reads)], env=child_env())


@contextmanager
def served(cache: Path, socket_dir: str, log: Path) -> Iterator[str]:
    """``bootcache serve`` of ``cache``; yields its NBD URI, stops with SIGTERM."""
    sock = os.path.join(socket_dir, "bc.sock")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bootcache", "serve", "--socket", sock,
                                 f"{cache}=cache"], stdout=out, stderr=subprocess.STDOUT,
                                env=child_env())
        try:
            # It says so once every endpoint listens (the control socket too).
            wait_for(lambda: b"serving" in log.read_bytes() or proc.poll() is not None, 30,
                     "bootcache serve")
            assert proc.poll() is None, log.read_text()
            yield f"nbd+unix:///cache?socket={sock}"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def leftovers(folder: Path) -> list[str]:
    """Hidden files a publish or pull may leave behind (temporary, partial)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
