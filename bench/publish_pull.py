"""Published caches of real guests: size, pull time on a shaped link, boots from them.

For each boot trace, on the real guest disk it was recorded from:

1. the base (the guest's raw disk) sits behind nbdkit with the rate and log
   filters (the storage link, ``--boot-rate``); a cache over it is warmed by
   one replay of the trace through ``bootcache serve`` (a cold boot);
2. the warm cache is published to a file: raw size (its data clusters)
   against the artifact's size (goal: at most 0.7x);
3. the artifact is served by nginx in a network namespace whose egress tbf
   shapes to ``--rate``; ``bootcache cache pull`` runs outside and its own
   time (from start to the cache linked into place, identity check and fsync
   included; not the interpreter's start nor loading the HTTP client
   library, whose cost the command's wall time shows) is compared with
   artifact size / rate (goal: at most 1.1x), median of ``--repeat`` pulls;
   a pull of the same artifact from a local file gives the floor set by
   this machine (decompressing, hashing, writing, fsync), with no network;
4. the warm cache and the last pulled cache are served by two daemons at
   once; after one untimed boot of each, the trace is replayed against each
   in turn, ``--boots`` times, every other time pulled first: median boot
   times and the median of the pairs' ratios (goal: pulled within 1.05x of
   warm) and the bytes that crossed the storage link during the pulled
   boots (goal: 0).

Traces and guests (see /work/shared/traces/README.md):
- minbase: /var/cache/bootcache-tests/guest-v2/root.raw (tests/e2e/build_guest.sh)
  with /work/shared/guests/debian12-minbase-guest-v2/boot.trace, or the
  shipped debian12 trace;
- services: /var/cache/bootcache-tests/services-guest-v1/disk.raw with
  /work/shared/traces/debian12-services-boot.trace.

Needs root for the namespace (as bench/remote_read.py, whose namespace and
server helpers it uses).

Usage:
    .venv/bin/python bench/publish_pull.py [--rate 1gbit] [--repeat 5]
        [--traces minbase,services] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import remote_read as rr
from bootcache.storm import nodes
from bootcache.storm.replay import replay_one
from bootcache.storm.trace import Trace, load, shipped

# Its own addresses: bench/remote_read.py may run at the same time elsewhere.
rr.HOST_IP, rr.NS_IP = "10.207.0.1", "10.207.0.2"
HTTP_PORT = 8087

# guest disk, trace file recorded on it, shipped trace to use when that file is gone
GUESTS = {
    "minbase": ("/var/cache/bootcache-tests/guest-v2/root.raw",
                "/work/shared/guests/debian12-minbase-guest-v2/boot.trace", "debian12-minbase"),
    "services": ("/var/cache/bootcache-tests/services-guest-v1/disk.raw",
                 "/work/shared/traces/debian12-services-boot.trace", "debian12-services"),
}


def bootcache(*args: str) -> dict[str, Any]:
    """Run a command with JSON output; adds its wall time (process start to exit)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bootcache", *args, "--output", "json"],
                          capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode:
        raise RuntimeError(f"bootcache {' '.join(args)}: {proc.stderr.strip()}")
    out: dict[str, Any] = json.loads(proc.stdout)
    out["wall"] = wall
    return out


def replay(uri: str, trace: Trace) -> float:
    return asyncio.run(replay_one(uri, trace)).seconds


def one_trace(name: str, base: str, trace: Trace, args: argparse.Namespace,
              work: Path) -> dict[str, Any]:
    link = nodes.Link(str(work), ["file", base, "--readonly"], args.boot_rate).start()
    daemons: list[nodes.Process] = []
    try:
        cache = work / "cache.qcow2"
        size = os.path.getsize(base)
        nodes.create_cache(str(cache), link.uri, 2 << 30, size)
        warm = nodes.bootcache_serve(str(work), "warm", str(cache)).start()
        replay(f"nbd+unix:///boot?socket={warm.sock}", trace)  # the cold boot fills it
        warm.stop()
        art = work / "www" / "boot.qcow2"
        art.parent.mkdir()
        pub = bootcache("cache", "publish", str(cache), str(art))
        print(f"{name}: published {pub['raw-bytes'] / 2**20:.1f} MiB as "
              f"{pub['artifact-bytes'] / 2**20:.1f} MiB ({pub['ratio']:.3f}x) "
              f"in {pub['seconds']:.2f} s", flush=True)
        pulls, walls, curls = pull_times(art, work, args)
        local = []
        for _ in range(args.repeat):
            target = work / "local.qcow2"
            if target.exists():
                target.unlink()
            local.append(bootcache("cache", "pull", str(art), str(target))["seconds"])
        pulled = work / "pulled.qcow2"
        warm = nodes.bootcache_serve(str(work), "warm", str(cache)).start()
        got = nodes.bootcache_serve(str(work), "pulled", str(pulled), export="boot").start()
        daemons += [warm, got]
        warm_uri = f"nbd+unix:///boot?socket={warm.sock}"
        pulled_uri = f"nbd+unix:///boot?socket={got.sock}"
        # One untimed boot each: the pulled image was written around the page
        # cache (O_DIRECT), the warm one through it; both are read from memory after.
        link.mark()
        replay(warm_uri, trace)
        replay(pulled_uri, trace)
        base_bytes = link.bytes_since_mark()
        warm_times, pulled_times = [], []
        for i in range(max(args.boots, 1)):
            # Taking turns in both orders (ABBA): the second of two back-to-back
            # boots is not always the same cache.
            order = ["warm", "pulled"] if i % 2 == 0 else ["pulled", "warm"]
            for which in order:
                if which == "warm":
                    warm_times.append(replay(warm_uri, trace))
                else:
                    link.mark()
                    pulled_times.append(replay(pulled_uri, trace))
                    base_bytes += link.bytes_since_mark()
        rate_bps = rr.parse_rate(args.rate)
        ideal = pub["artifact-bytes"] * 8 / rate_bps
        result = {
            "trace": name, "reads": len(trace.requests), "raw_bytes": pub["raw-bytes"],
            "artifact_bytes": pub["artifact-bytes"], "size_ratio": pub["ratio"],
            "publish_s": pub["seconds"], "rate": args.rate, "pull_s": pulls,
            "pull_median_s": statistics.median(pulls), "pull_ideal_s": ideal,
            "pull_ratio": statistics.median(pulls) / ideal,
            "curl_s": curls, "curl_median_s": statistics.median(curls),
            "pull_curl_ratio": statistics.median(pulls) / statistics.median(curls),
            "pull_wall_s": walls, "pull_wall_median_s": statistics.median(walls),
            "local_pull_s": local, "local_pull_median_s": statistics.median(local),
            "warm_boot_s": warm_times, "pulled_boot_s": pulled_times,
            "boot_ratio": statistics.median(pulled_times) / statistics.median(warm_times),
            "boot_pair_ratio": statistics.median(p / w for p, w in zip(pulled_times, warm_times,
                                                                       strict=True)),
            "boot_ratio_best": min(pulled_times) / min(warm_times),
            "pulled_base_bytes": base_bytes,
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        for d in daemons:
            d.stop()
        link.stop()


def pull_times(art: Path, work: Path, args: argparse.Namespace
               ) -> tuple[list[float], list[float], list[float]]:
    """Pull times of the artifact over the shaped link: the pull's own (client
    library loaded), the command's wall time, and curl's time to fetch the same
    object into a file over the same link (taking turns with the pulls)."""
    times, walls, curls = [], [], []
    with rr.Namespace(rr.parse_rate(args.rate)) as ns:
        d = work / "nginx"
        (d / "tmp").mkdir(parents=True)
        conf = d / "nginx.conf"
        conf.write_text(rr.NGINX_CONF.format(user=os.environ.get("USER", "root"), d=d,
                                             root=art.parent, host=rr.NS_IP, port=HTTP_PORT))
        srv = rr.Server(["nginx", "-c", str(conf), "-p", str(d), "-g", "daemon off;"],
                        work / "nginx.log", HTTP_PORT, ns)
        try:
            srv.wait_port()
            url = f"http://{rr.NS_IP}:{HTTP_PORT}/{art.name}"
            for _ in range(args.repeat):
                fetched = work / "curl.out"
                out = subprocess.run(["curl", "-sSf", "-o", str(fetched), "-w", "%{time_total}",
                                      url], capture_output=True, text=True, check=True).stdout
                assert fetched.stat().st_size == os.path.getsize(art)
                fetched.unlink()
                curls.append(float(out))
                target = work / "pulled.qcow2"
                if target.exists():
                    target.unlink()
                res = bootcache("cache", "pull", url, str(target))
                assert res["downloaded-bytes"] == os.path.getsize(art)
                times.append(res["seconds"])
                walls.append(res["wall"])
        finally:
            srv.stop()
    return times, walls, curls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", default="1gbit", help="link rate of the pull (tc units)")
    ap.add_argument("--boot-rate", default="1G", help="storage link of the boots (nbdkit)")
    ap.add_argument("--repeat", type=int, default=5, help="pulls")
    ap.add_argument("--boots", type=int, default=15, help="replays of each cache")
    ap.add_argument("--traces", default="minbase,services")
    ap.add_argument("--json", default="bench/out/publish_pull.json")
    args = ap.parse_args()
    why = rr.netns_possible()
    if why:
        sys.exit(f"publish_pull needs a network namespace: {why}")
    results = []
    for name in args.traces.split(","):
        base, trace_path, shipped_name = GUESTS[name]
        if not os.path.exists(base):
            print(f"{name}: {base} missing (build the guest first); skipped", file=sys.stderr)
            continue
        trace = load(trace_path) if os.path.exists(trace_path) else shipped(shipped_name)
        work = Path(tempfile.mkdtemp(prefix=f"bcpub-{name}-"))
        try:
            t0 = time.monotonic()
            results.append(one_trace(name, base, trace, args, work))
            print(f"{name}: done in {time.monotonic() - t0:.0f} s", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print()
    print("| trace | raw | published | size | pull | size/rate | pull ratio | curl | pull/curl "
          "| pull, CLI wall | local pull | warm boot | pulled boot | boot ratio (median, best, "
          "median of pairs) | base bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['trace']} | {r['raw_bytes'] / 2**20:.1f} MiB "
              f"| {r['artifact_bytes'] / 2**20:.1f} MiB | {r['size_ratio']:.3f}x "
              f"| {r['pull_median_s']:.3f} s | {r['pull_ideal_s']:.3f} s "
              f"| {r['pull_ratio']:.2f}x | {r['curl_median_s']:.3f} s "
              f"| {r['pull_curl_ratio']:.2f}x | {r['pull_wall_median_s']:.3f} s "
              f"| {r['local_pull_median_s']:.3f} s "
              f"| {statistics.median(r['warm_boot_s']):.3f} s "
              f"| {statistics.median(r['pulled_boot_s']):.3f} s "
              f"| {r['boot_ratio']:.3f}x, {r['boot_ratio_best']:.3f}x, "
              f"{r['boot_pair_ratio']:.3f}x "
              f"| {r['pulled_base_bytes']} |")


if __name__ == "__main__":
    main()
