"""NBD read throughput: bootcache serve vs nbdkit (file plugin) vs qemu-nbd.

All three serve the same raw file, read-only, on UNIX sockets, in the same
run; fio's nbd engine (libnbd) is the client. Two workloads:

- 4K random reads at queue depth 16
- 1M sequential reads at queue depth 4

Usage:
    .venv/bin/python bench/nbd_read.py [--size 1G] [--runtime 10] [--repeat 3] [--cache]

With --cache, bootcache serves a warm cache image (a qcow2 cache over the
raw file as its base, filled by one full read before measuring) while
nbdkit and qemu-nbd serve the raw file: the same data, bootcache's real path.

Prints IOPS and MiB/s for each server and the ratios bootcache/nbdkit and
bootcache/qemu-nbd (best of --repeat runs each, runs interleaved so that
drift in machine load hits every server alike). It also prints each
server's CPU time per request (user + system, all its threads, from
/proc/PID/stat): on a machine shared with other work, throughput follows
the scheduler's share (a many-threaded server gets more of it), while CPU
per request measures the server's own cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")

WORKLOADS = {
    "4k-randread-qd16": ["--rw=randread", "--bs=4k", "--iodepth=16"],
    "1m-seqread-qd4": ["--rw=read", "--bs=1M", "--iodepth=4"],
    # 64 connections at once, one request each in flight: a node with 64 VMs.
    "4k-randread-64conn": ["--rw=randread", "--bs=4k", "--iodepth=1", "--numjobs=64",
                           "--group_reporting"],
}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.args}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"no socket at {path}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server(kind: str, image: str, sock: str,
           cache: str | None = None) -> Iterator[tuple[str, int]]:
    if kind == "bootcache":
        cmd = [PYTHON, "-m", "bootcache.cli.serve", "--read-only", "--socket", sock,
               f"{cache or image}=disk"]
    elif kind == "nbdkit":
        cmd = ["nbdkit", "--foreground", "--readonly", "--unix", sock, "file", image]
    else:
        cmd = ["qemu-nbd", "--read-only", "--format=raw", "--persistent",
               "--shared=64", "--socket", sock, image]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_socket(sock, proc)
        yield f"nbd+unix:///{'disk' if kind == 'bootcache' else ''}?socket={sock}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def make_warm_cache(image: str, tmp: str) -> str:
    """A cache image over ``image``, filled by reading it all through the server."""
    cache = os.path.join(tmp, "cache.qcow2")
    subprocess.run([PYTHON, "-m", "bootcache", "create", "-f", "qcow2", "-b", image, "-F",
                    "raw", "-o", "cache_img_quota=100G", cache], check=True,
                   capture_output=True)
    with server("bootcache", image, os.path.join(tmp, "warm.sock"), cache) as (uri, _):
        subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return cache


def fio(uri: str, workload: list[str], runtime: int, size: int) -> dict[str, float]:
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--direct=1",
           f"--size={size}", "--time_based", f"--runtime={runtime}",
           "--numjobs=1", "--output-format=json", *workload]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"iops": float(job["iops"]), "mibs": float(job["bw_bytes"]) / (1 << 20),
            "ios": float(job["total_ios"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="size of the served file")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per server and workload")
    ap.add_argument("--servers", default="bootcache,nbdkit,qemu-nbd")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--cache", action="store_true",
                    help="bootcache serves a warm cache image of the file")
    args = ap.parse_args()
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"missing {tool}", file=sys.stderr)
            return 2
    size = parse_size(args.size)
    kinds = args.servers.split(",")
    with tempfile.TemporaryDirectory(prefix="nbdbench.", dir="/tmp") as tmp:
        image = os.path.join(tmp, "disk.raw")
        with open(image, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        with open(image, "rb") as f:  # warm the page cache
            while f.read(8 << 20):
                pass
        cache = make_warm_cache(image, tmp) if args.cache else None
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name in args.workloads.split(","):
            for _ in range(args.repeat):
                for kind in kinds:
                    sock = os.path.join(tmp, f"{kind}.sock")
                    with server(kind, image, sock, cache) as (uri, pid):
                        cpu = cpu_seconds(pid)
                        r = fio(uri, WORKLOADS[name], args.runtime, size)
                        r["cpu_us"] = (cpu_seconds(pid) - cpu) / max(r["ios"], 1) * 1e6
                    best = results.setdefault(name, {}).get(kind)
                    if best is None or r["iops"] > best["iops"]:
                        results[name][kind] = r
        print(f"{'workload':<18} {'server':<10} {'IOPS':>10} {'MiB/s':>9} {'CPU us/req':>11}")
        for name, by_kind in results.items():
            for kind, r in by_kind.items():
                print(f"{name:<18} {kind:<10} {r['iops']:>10.0f} {r['mibs']:>9.1f} "
                      f"{r['cpu_us']:>11.1f}")
            mine = by_kind.get("bootcache")
            for other in ("nbdkit", "qemu-nbd"):
                if mine and other in by_kind:
                    print(f"{name:<18} bootcache/{other}: "
                          f"{mine['iops'] / by_kind[other]['iops']:.2f}x throughput, "
                          f"{by_kind[other]['cpu_us'] / mine['cpu_us']:.2f}x less CPU "
                          f"per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
