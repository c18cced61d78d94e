"""CPU per ranged GET of the HTTP source alone (no cache), against nginx on localhost.

N ranged GETs of 64 KiB are read one after another through ``HttpSource.pread``
on uvloop; the event loop thread's CPU (``time.thread_time``), the whole
process's CPU and the wall time are divided by N. The loop thread is what
the node's NBD serving shares; the rest is the transport's worker thread.
Median of ``--repeat`` runs, each on a fresh source.

Usage:
    .venv/bin/python bench/http_get.py [--requests 3000] [--repeat 5] [--size 65536]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).parent))

from bootcache.sources.http import HttpSource
from remote_read import start_http, workdir


async def run(url: str, requests: int, size: int, span: int) -> dict[str, float]:
    src = await HttpSource.open(url)
    try:
        for _ in range(50):  # connections up, handles made
            await src.pread(0, size)
        loop0, proc0, wall0 = time.thread_time(), time.process_time(), time.monotonic()
        for i in range(requests):
            await src.pread((i * size) % (span - size), size)
        return {"loop_us": (time.thread_time() - loop0) / requests * 1e6,
                "process_us": (time.process_time() - proc0) / requests * 1e6,
                "wall_us": (time.monotonic() - wall0) / requests * 1e6}
    finally:
        await src.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=64 << 10)
    args = ap.parse_args()
    span = 256 << 20
    with workdir(False) as work:
        base = work / "base.raw"
        with open(base, "wb") as f:
            f.truncate(span)
            for off in range(0, span, 16 << 20):  # real bytes, not a sparse file
                f.seek(off)
                f.write(os.urandom(16 << 20))
        server, url = start_http(work, base, None)
        try:
            rows = [uvloop.run(run(url, args.requests, args.size, span))
                    for _ in range(args.repeat)]
        finally:
            server.stop()
    for key in ("loop_us", "process_us", "wall_us"):
        runs = ", ".join(f"{r[key]:.1f}" for r in rows)
        print(f"{key}: median {statistics.median(r[key] for r in rows):.1f} ({runs})")


if __name__ == "__main__":
    main()
