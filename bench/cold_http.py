"""A cold cache over an HTTP (or S3) base vs nbdkit's cache filter over its curl plugin.

A boot trace, its gaps between runs shortened as in bench/remote_read.py,
is replayed as fast as possible (pure I/O) through NBD by K readers taking
the requests in trace order, against:

- ``bootcache serve`` of a fresh cache image whose base is
  ``http://127.0.0.1/base.raw`` (nginx on this machine);
- ``nbdkit --filter=cache curl url=... cache-on-read=true`` (a fresh
  process, so a cold cache, every run);
- with ``--s3``, ``bootcache serve`` of a cache over ``s3://bench/base.raw``
  (SeaweedFS on this machine).

The same client (bootcache's NBD client, in this process) drives every
server, and every byte read is compared with the base. Runs of the servers
alternate; the median of ``--repeat`` runs is reported with the ratio to
nbdkit (time / nbdkit's time) and, with ``--s3``, S3 to HTTP, and each
server's CPU time (user + system, all threads) during the replay.

Usage:
    .venv/bin/python bench/cold_http.py [--readers 1,8] [--repeat 3] [--s3]
        [--trace PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bootcache.nbd.client import NbdConnection, parse_nbd_uri
from bootcache.storm.nodes import Process, bootcache_serve, create_cache, need
from bootcache.storm.trace import debian12, load_named
from remote_read import compact, start_http, start_s3, workdir


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def replay(uri: str, requests: list[Any], readers: int, base: bytes) -> float:
    conns = [await NbdConnection.connect(parse_nbd_uri(uri)) for _ in range(readers)]
    it = iter(requests)
    wrong: list[str] = []

    async def reader(conn: NbdConnection) -> None:
        for r in it:
            data = await conn.pread(r.offset, r.length)
            if data != base[r.offset:r.offset + r.length]:
                wrong.append(f"{r.offset}+{r.length}")

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(reader(c) for c in conns))
        seconds = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.close()
    if wrong:
        raise SystemExit(f"{uri}: wrong bytes at {wrong[:5]}")
    return seconds


#: Server CPU seconds per replay, by server.
CPU: dict[str, list[float]] = {}


def run_bootcache(work: Path, name: str, base_uri: str, size: int, requests: list[Any],
                  readers: int, base: bytes) -> float:
    image = str(work / f"{name}.qcow2")
    create_cache(image, base_uri, 1 << 30, size)
    proc = bootcache_serve(str(work), name, image).start()
    try:
        assert proc.proc is not None
        cpu0 = cpu_seconds(proc.proc.pid)
        seconds = asyncio.run(replay(f"nbd+unix:///boot?socket={proc.sock}", requests,
                                     readers, base))
        CPU.setdefault(name, []).append(cpu_seconds(proc.proc.pid) - cpu0)
        return seconds
    finally:
        proc.stop()
        Path(image).unlink()


def run_nbdkit(work: Path, url: str, requests: list[Any], readers: int, base: bytes) -> float:
    sock = str(work / "nbdkit.sock")
    argv = [need("nbdkit"), "-f", "-U", sock, "--filter=cache", "curl", f"url={url}",
            "cache-on-read=true"]
    proc = Process("nbdkit cache+curl", argv, sock, str(work / "nbdkit.out")).start()
    try:
        assert proc.proc is not None
        cpu0 = cpu_seconds(proc.proc.pid)
        seconds = asyncio.run(replay(f"nbd+unix:///?socket={sock}", requests, readers, base))
        CPU.setdefault("nbdkit", []).append(cpu_seconds(proc.proc.pid) - cpu0)
        return seconds
    finally:
        proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readers", default="1,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--s3", action="store_true", help="also a cache over S3 (SeaweedFS)")
    ap.add_argument("--trace", help="a shipped trace or a trace file")
    args = ap.parse_args()
    trace = load_named(args.trace) if args.trace else debian12()
    requests, size = compact(trace)
    rows = []
    with workdir(False) as work:
        base_path = work / "base.raw"
        base = random.Random(5).randbytes(size)
        base_path.write_bytes(base)
        (work / "http").mkdir()
        http_srv, http_url = start_http(work / "http", base_path, None)
        s3_srv = None
        if args.s3:
            (work / "s3").mkdir()
            s3_srv, s3_url = start_s3(work / "s3", base_path, None)
        try:
            for k in [int(x) for x in args.readers.split(",")]:
                times: dict[str, list[float]] = {"bootcache-http": [], "nbdkit-curl": []}
                if args.s3:
                    times["bootcache-s3"] = []
                for _ in range(args.repeat):
                    times["bootcache-http"].append(run_bootcache(
                        work, "bc-http", http_url, size, requests, k, base))
                    times["nbdkit-curl"].append(run_nbdkit(work, http_url, requests, k, base))
                    if args.s3:
                        times["bootcache-s3"].append(run_bootcache(
                            work, "bc-s3", s3_url, size, requests, k, base))
                med = {name: statistics.median(ts) for name, ts in times.items()}
                row: dict[str, Any] = {"readers": k, **{f"{n}_s": round(v, 3)
                                                        for n, v in med.items()}}
                row["http_vs_nbdkit"] = round(med["bootcache-http"] / med["nbdkit-curl"], 2)
                if args.s3:
                    row["s3_vs_http"] = round(med["bootcache-s3"] / med["bootcache-http"], 2)
                row["server_cpu_s"] = {n: round(statistics.median(c), 3) for n, c in CPU.items()}
                CPU.clear()
                row["runs"] = {n: [round(t, 3) for t in ts] for n, ts in times.items()}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            http_srv.stop()
            if s3_srv:
                s3_srv.stop()
    print(f"\ntrace: {len(requests)} reads, base {size / 2**20:.1f} MiB; median of "
          f"{args.repeat}; ratio = bootcache's time / the peer's")
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items() if k != "runs"))


if __name__ == "__main__":
    main()
