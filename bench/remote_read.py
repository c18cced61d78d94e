"""Cold boot reads through a cache over a remote base, on a rate-shaped link.

A Debian 12 boot trace (``--trace``, default the shipped debian12-minbase) is replayed
through a fresh cache image whose base sits behind a server on the far side
of a veth pair, in a network namespace this script creates and removes.
Traffic from the servers to bootcache is shaped by ``tc`` (tbf) on the
namespace's end of the pair; bootcache runs outside, reading as fast as it
can. Sources: HTTP (nginx), S3 (SeaweedFS), NBD (nbdkit), NBD (qemu-nbd).

The default trace touches 809 distinct 64 KiB blocks (50.6 MiB) in 123 runs spread
over a 4 GiB disk. The base is the same disk with the gaps between runs
shortened to one block (so the S3 upload is 58 MiB, not 4 GiB): every run
keeps its length and stays apart from its neighbours, every request keeps
its size and order.

For each source the trace is replayed by 1 reader (the cache's default
fetching: one miss after another, as a guest with queue depth 1 issues
them) and by N concurrent readers taking the requests in trace order (a
guest with queue depth N). Reported per run:

- goodput: bytes the source delivered (its own ``stats()["bytes"]``) over
  the replay's time, as a fraction of the shaped rate;
- link: bytes tbf sent (frames: payload plus TCP/IP/Ethernet headers, what
  it charges against the rate) over the same time, as a fraction of the rate.

The cap on goodput is the payload share of a full frame: 1448/1514 = 95.6%
of the shaped rate with a 1500 MTU and TCP timestamps.

Needs root (ip netns, veth, tc). Without it, or where namespaces are
refused, it falls back to nbdkit's rate filter for the NBD source alone.

With ``--curl``, each HTTP or S3 pass is followed by curl fetching the
ranges that pass read from the source, with the same concurrency
(``--parallel --parallel-max N``; S3 requests signed by curl's
``--aws-sigv4``), bodies discarded: the peer for goodput.

Usage:
    .venv/bin/python bench/remote_read.py [--rate 100mbit] [--readers 1,8]
        [--sources http,s3,nbdkit,qemu-nbd] [--repeat 1] [--curl] [--json FILE]
        [--trace debian12-minbase|debian12-services|FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import open_layer
from bootcache.storm.trace import SHIPPED, Request, Trace, load_named

BLOCK = 64 << 10
HOST_IP, NS_IP = "10.200.0.1", "10.200.0.2"
PORTS = {"http": 8080, "s3": 8333, "nbdkit": 10809, "qemu-nbd": 10810}
S3_KEY, S3_SECRET = "bench", "bench-secret"
# The S3 gateway's chunk cache, shared by all GETs, as a storage node serving
# one image to many nodes would run it: without it every ranged GET has the
# gateway fetch its 4 MiB chunk from the volume server afresh (SeaweedFS's
# GET path reads whole chunks), so a 64 KiB read costs a chunk's transfer.
# Measured on the boot trace's ranges: bootcache's cold replay over S3 16%
# faster with one reader and 31% with eight (BENCHMARKS.md, issue 13).
S3_READ_CACHE = ["-s3.cacheCapacityMB=256"]
WEED = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))


def parse_rate(text: str) -> int:
    """'100mbit' -> bits per second (tc's units: kbit, mbit, gbit; powers of 1000)."""
    t = text.lower().strip()
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


# -- the working set --------------------------------------------------------------

def compact(trace: Trace) -> tuple[list[Request], int]:
    """The trace's requests moved onto a disk whose gaps between runs of touched
    blocks are one block long; returns the requests and the disk's size."""
    blocks = sorted(trace.blocks(BLOCK))
    new_start: dict[int, int] = {}  # first block of each run -> its new first block
    run_of: dict[int, int] = {}
    pos, prev, run = 0, None, None
    for b in blocks:
        if prev is None or b != prev + 1:
            if prev is not None:
                pos += 1  # the one-block gap
            run = b
            new_start[run] = pos
        assert run is not None
        run_of[b] = run
        pos += 1
        prev = b
    moved = []
    for r in trace.requests:
        run = run_of[r.offset // BLOCK]
        moved.append(Request(r.time, r.offset - run * BLOCK + new_start[run] * BLOCK, r.length))
    return moved, (pos + 1) * BLOCK


# -- processes and the namespace ----------------------------------------------------

def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


class Namespace:
    """A network namespace joined to this one by a veth pair, its egress shaped."""

    def __init__(self, rate_bps: int) -> None:
        tag = str(os.getpid() % 100000)
        self.name = f"bcbench{tag}"
        self.host_if, self.ns_if = f"bcbh{tag}", f"bcbn{tag}"
        self.rate = rate_bps

    def __enter__(self) -> Namespace:
        try:
            sh("ip", "netns", "add", self.name)
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            sh("ip", "link", "set", self.ns_if, "netns", self.name)
            sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", self.host_if)
            sh("ip", "link", "set", self.host_if, "up")
            self.run("ip", "addr", "add", f"{NS_IP}/24", "dev", self.ns_if)
            self.run("ip", "link", "set", self.ns_if, "up")
            self.run("ip", "link", "set", "lo", "up")
            # tbf: a bucket of 1/100 s of traffic (at least 32 KB), a deep queue
            # (drops cost throughput, queueing delay does not).
            burst = max(self.rate // 8 // 100, 32 << 10)
            self.run("tc", "qdisc", "add", "dev", self.ns_if, "root", "tbf",
                     "rate", f"{self.rate}bit", "burst", str(burst), "latency", "400ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        sh("ip", "link", "del", self.host_if, check=False)  # takes its peer along
        sh("ip", "netns", "del", self.name, check=False)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.name, *argv)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def sent_bytes(self) -> int:
        """Bytes tbf has sent (and charged against the rate): frames with headers."""
        out = json.loads(self.run("tc", "-s", "-j", "qdisc", "show", "dev", self.ns_if).stdout)
        return sum(int(q.get("bytes", 0)) for q in out if q.get("kind") == "tbf")

    def qdisc(self) -> str:
        return self.run("tc", "-s", "qdisc", "show", "dev", self.ns_if).stdout


class Server:
    """A server process (in the namespace when given one), in its own session."""

    def __init__(self, argv: list[str], log: Path, port: int, ns: Namespace | None,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.argv = (ns.prefix() if ns else []) + argv
        self.port = port
        self.host = NS_IP if ns else "127.0.0.1"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=env, cwd=cwd)
        self.log = log

    def wait_port(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited:\n{self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.argv[0]} not listening on {self.host}:{self.port}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()


NGINX_CONF = """\
user {user};
worker_processes 2;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{ listen {host}:{port}; root {root}; }}
}}
"""


def start_http(work: Path, base: Path, ns: Namespace | None) -> tuple[Server, str]:
    d = work / "nginx"
    (d / "tmp").mkdir(parents=True)
    root = work / "www"
    root.mkdir()
    os.link(base, root / "base.raw")
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=os.environ.get("USER", "root"), d=d, root=root,
                                      host=NS_IP if ns else "127.0.0.1", port=PORTS["http"]))
    srv = Server(["nginx", "-c", str(conf), "-p", str(d), "-g", "daemon off;"],
                 work / "nginx.log", PORTS["http"], ns)
    srv.wait_port()
    return srv, f"http://{srv.host}:{srv.port}/base.raw"


def start_s3(work: Path, base: Path, ns: Namespace | None) -> tuple[Server, str]:
    d = work / "weed"
    (d / "data").mkdir(parents=True)
    host = NS_IP if ns else "127.0.0.1"
    (d / "s3.json").write_text(json.dumps({"identities": [{
        "name": "bench", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List"]}]}))
    argv = [WEED, "server", f"-dir={d / 'data'}", f"-ip={host}", f"-ip.bind={host}",
            "-master.port=9333", "-volume.port=8081", "-filer", "-filer.port=8888",
            "-s3", f"-s3.port={PORTS['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={d / 's3.json'}", "-master.telemetry=false",
            "-master.resumeState=false", "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=1024", *S3_READ_CACHE]
    srv = Server(argv, work / "weed.log", PORTS["s3"], ns, cwd=d)
    srv.wait_port()
    endpoint = f"http://{host}:{PORTS['s3']}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY,
                       "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_REGION": "us-east-1",
                       "AWS_CONFIG_FILE": str(d / "none"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(d / "none")})
    asyncio.run(upload(endpoint, base))
    return srv, "s3://bench/base.raw"


async def upload(endpoint: str, base: Path) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET) as c:
        end = time.monotonic() + 60
        while True:  # the gateway answers before the filer and volumes are ready
            try:
                with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou,
                                         c.exceptions.BucketAlreadyExists):
                    await c.create_bucket(Bucket="bench")
                await c.put_object(Bucket="bench", Key="base.raw", Body=base.read_bytes())
                return
            except Exception:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.5)


def start_nbdkit(work: Path, base: Path, ns: Namespace | None,
                 rate_bps: int | None = None) -> tuple[Server, str]:
    host = NS_IP if ns else "127.0.0.1"
    argv = ["nbdkit", "--foreground", "--readonly", "--ipaddr", host,
            "--port", str(PORTS["nbdkit"])]
    if rate_bps is not None:  # the fallback shaping, without a namespace
        argv += ["--filter=rate"]
    argv += ["file", str(base)]
    if rate_bps is not None:
        argv += [f"rate={rate_bps}", "burstiness=0.05"]
    srv = Server(argv, work / "nbdkit.log", PORTS["nbdkit"], ns)
    srv.wait_port()
    return srv, f"nbd://{host}:{PORTS['nbdkit']}/"


def start_qemu_nbd(work: Path, base: Path, ns: Namespace | None) -> tuple[Server, str]:
    host = NS_IP if ns else "127.0.0.1"
    argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=16", "--format=raw",
            "--cache=writeback", f"--bind={host}", f"--port={PORTS['qemu-nbd']}", str(base)]
    srv = Server(argv, work / "qemu-nbd.log", PORTS["qemu-nbd"], ns)
    srv.wait_port()
    return srv, f"nbd://{host}:{PORTS['qemu-nbd']}/"


# -- one measured replay ----------------------------------------------------------------

@dataclass
class Result:
    source: str
    readers: int
    seconds: float
    payload: int
    link: int
    requests: int
    steady_bps: float

    def row(self, rate: int) -> dict[str, Any]:
        return {"source": self.source, "readers": self.readers,
                "seconds": round(self.seconds, 3), "MiB": round(self.payload / 2**20, 2),
                "requests": self.requests,
                "goodput_Mbit": round(self.payload * 8 / self.seconds / 1e6, 1),
                "goodput_pct": round(100 * self.payload * 8 / self.seconds / rate, 1),
                "steady_pct": round(100 * self.steady_bps / rate, 1),
                "link_pct": round(100 * self.link * 8 / self.seconds / rate, 1)
                if self.link else None}


async def replay(cache: Path, requests: list[Request], readers: int, source: str,
                 rx: Any, fetched: list[tuple[int, int]] | None = None) -> Result:
    layer = await open_layer(str(cache))
    assert isinstance(layer, CacheLayer)
    src = layer.base.source  # type: ignore[attr-defined]
    if fetched is not None:  # note the ranges read from the source, for curl
        real = src.pread

        async def noting(offset: int, length: int) -> bytes:
            fetched.append((offset, length))
            return await real(offset, length)
        src.pread = noting
    try:
        before = src.stats()
        link0 = rx()
        samples: list[tuple[float, int]] = []
        done = False

        async def sample() -> None:
            while not done:
                samples.append((time.monotonic(), src.stats()["bytes"]))
                await asyncio.sleep(0.02)

        it = iter(requests)

        async def reader() -> None:
            for r in it:
                await layer.pread(r.offset, r.length)

        sampler = asyncio.create_task(sample())
        t0 = time.monotonic()
        await asyncio.gather(*(reader() for _ in range(readers)))
        t1 = time.monotonic()
        done = True
        await sampler
        after = src.stats()
        link = rx() - link0
        await layer.settle()
    finally:
        await layer.close()
    payload = after["bytes"] - before["bytes"]
    # Steady rate: from 10% to 90% of the bytes (start-up and the tail left out).
    base_b = before["bytes"]
    lo = next((t for t, b in samples if b - base_b >= 0.1 * payload), t0)
    hi = next((t for t, b in samples if b - base_b >= 0.9 * payload), t1)
    steady = 0.8 * payload * 8 / (hi - lo) if hi > lo else 0.0
    return Result(source, readers, t1 - t0, payload, link,
                  after["requests"] - before["requests"], steady)


def curl_fetch(work: Path, uri: str, ranges: list[tuple[int, int]], readers: int,
               rx: Any) -> Result:
    """curl fetching ``ranges`` of the base, ``readers`` transfers at once
    (--parallel), bodies discarded: the same requests a cache pass made."""
    if uri.startswith("s3://"):
        bucket_key = uri[len("s3://"):]
        url = f"{os.environ['AWS_ENDPOINT_URL']}/{bucket_key}"
        auth = (f'aws-sigv4 = "aws:amz:{os.environ["AWS_REGION"]}:s3"\n'
                f'user = "{S3_KEY}:{S3_SECRET}"\n')
    else:
        url, auth = uri, ""
    cfg = work / "curl.cfg"
    cfg.write_text("next\n".join(
        f'url = "{url}"\nrange = "{off}-{off + n - 1}"\noutput = "/dev/null"\n{auth}'
        for off, n in ranges))
    link0 = rx()
    t0 = time.monotonic()
    subprocess.run(["curl", "--no-progress-meter", "--fail", "--parallel",
                    "--parallel-max", str(readers), "--config", str(cfg)], check=True)
    seconds = time.monotonic() - t0
    payload = sum(n for _, n in ranges)
    return Result("curl " + ("s3" if auth else "http"), readers, seconds, payload,
                  rx() - link0, len(ranges), 0.0)


def make_cache(work: Path, uri: str, size: int, n: int) -> Path:
    cache = work / f"cache-{n}.qcow2"
    subprocess.run([sys.executable, "-m", "bootcache", "create", "-q", "-f", "qcow2",
                    "--cache-quota", "1G", "-b", uri, "-F", "raw", str(cache), str(size)],
                   check=True)
    return cache


def netns_possible() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "ip or tc missing"
    probe = f"bcbprobe{os.getpid() % 100000}"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bcremote", dir="/tmp"))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


STARTERS = {"http": start_http, "s3": start_s3, "nbdkit": start_nbdkit,
            "qemu-nbd": start_qemu_nbd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", default="100mbit", help="shaped rate (tc units)")
    ap.add_argument("--readers", default="1,8", help="concurrent readers, comma-separated")
    ap.add_argument("--sources", default="http,s3,nbdkit,qemu-nbd")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--curl", action="store_true",
                    help="after each HTTP/S3 pass, curl fetches the same ranges with "
                         "the same concurrency")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--trace", default="debian12-minbase",
                    help="boot trace: a shipped one by name (" + ", ".join(SHIPPED)
                    + ") or a trace file's path (default: %(default)s)")
    args = ap.parse_args()
    rate = parse_rate(args.rate)
    readers = [int(x) for x in args.readers.split(",")]
    sources = args.sources.split(",")

    trace = load_named(args.trace)
    requests, size = compact(trace)
    why_not = netns_possible()
    if why_not:
        print(f"no network namespace ({why_not}): shaping with nbdkit's rate filter, "
              "NBD (nbdkit) only", file=sys.stderr)
        sources = ["nbdkit"]

    rows = []
    with workdir(args.keep) as work, contextlib.ExitStack() as stack:
        base = work / "base.raw"
        base.write_bytes(random.Random(5).randbytes(size))  # incompressible
        ns = None if why_not else stack.enter_context(Namespace(rate))
        rx = ns.sent_bytes if ns else (lambda: 0)
        print(f"trace: {len(requests)} requests, {len(trace.blocks(BLOCK))} blocks "
              f"of 64 KiB; base {size / 2**20:.1f} MiB; rate {rate / 1e6:g} Mbit/s "
              f"({'tc tbf on a veth into ' + ns.name if ns else 'nbdkit rate filter'})",
              flush=True)
        n = 0
        for source in sources:
            sub = work / source
            sub.mkdir()
            if why_not:
                srv, uri = start_nbdkit(sub, base, None, rate)
            else:
                srv, uri = STARTERS[source](sub, base, ns)
            try:
                for _ in range(args.repeat):
                    for k in readers:
                        n += 1
                        cache = make_cache(work, uri, size, n)
                        fetched: list[tuple[int, int]] = []
                        res = asyncio.run(replay(cache, requests, k, source, rx, fetched))
                        cache.unlink()
                        row = res.row(rate)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args.curl and source in ("http", "s3"):
                            row = curl_fetch(work, uri, sorted(set(fetched)), k, rx).row(rate)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
            finally:
                srv.stop()
        if ns:
            print(ns.qdisc().strip(), file=sys.stderr)

    cols = ["source", "readers", "seconds", "MiB", "requests", "goodput_Mbit",
            "goodput_pct", "steady_pct", "link_pct"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rate_bps": rate, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
