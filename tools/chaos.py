"""Long fault campaigns against a real node, outside CI.

    .venv/bin/python tools/chaos.py outage --seconds 60 --rounds 3
    .venv/bin/python tools/chaos.py kill --rounds 100 --readers 64

A storage node (nbdkit serving a pattern base over a UNIX socket) and a
compute node (``bootcache serve`` with a cache over that base); readers are
qemu-io processes that check every byte they read (the base's cluster k
holds the byte k % 251 + 1), so a wrong byte cannot pass unseen.

- ``outage``: each round warms nothing, starts the readers on a cold cache,
  stops the base for ``--seconds``, restarts it. Reads either complete with
  the right bytes or fail with EIO (after the source's deadline); afterwards
  every cluster must read back right through the same daemon, and the cache
  must pass ``qemu-img check``.
- ``kill``: each round starts the readers on an LRU cache smaller than the
  disk, SIGKILLs the daemon at a random moment, checks the cache with
  ``qemu-img check`` (leaks allowed: the next owner reclaims them), restarts
  the daemon and reads everything back.

- ``link``: the base behind nginx in a network namespace, over a veth pair
  made slow and lossy (``tc netem`` delay 50 ms, loss 1%; where the kernel
  has no netem, the same by iptables: 1% loss by the statistic match, 50 ms
  delay by an NFQUEUE rule and tools/link_delay.py, each way). Each
  round starts the readers on a cold cache; they must all complete with the
  right bytes, and the bytes crossing the link (the veth's rx counter) must
  stay at about one working set. Needs root.

- ``replace``: the base behind nginx on loopback is replaced (a new ETag)
  at a random moment of each round while nbdcopy readers read the whole disk
  one two-cluster request at a time (an LRU cache smaller than the disk, so
  stores evict all along). Every request must be wholly one version, no
  reader may go back to the old version after the new one, and afterwards
  the cache must be clean and hold clusters of the new version only.

It prints one line per round and a summary: rounds, wrong bytes (must be 0),
corrupt images (must be 0), reads failed with EIO.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLUSTER = 64 << 10
PY = sys.executable


def wait_for(cond: object, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > end:
            raise SystemExit(f"{what}: not after {timeout}s")
        time.sleep(0.02)


class Node:
    """The storage node, the daemon and the readers of one campaign."""

    def __init__(self, work: Path, size: int, quota: str, policy: str, deadline: float) -> None:
        self.work = work
        self.size = size
        self.clusters = size // CLUSTER
        self.base_sock = str(work / "base.sock")
        self.sock = str(work / "node.sock")
        self.deadline = deadline
        with open(work / "base.raw", "wb") as f:
            for k in range(self.clusters):
                f.write(bytes([k % 251 + 1]) * CLUSTER)
        self.cache = work / "cache.qcow2"
        subprocess.run([PY, "-m", "bootcache", "create", "-q", "-f", "qcow2", "--cache-quota",
                        quota, "--cache-policy", policy, "-b",
                        f"nbd+unix:///?socket={self.base_sock}", "-F", "raw", str(self.cache),
                        str(size)], check=True)
        self.base: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    def start_base(self) -> None:
        if os.path.exists(self.base_sock):
            os.unlink(self.base_sock)  # left by a killed server
        self.base = subprocess.Popen(["nbdkit", "-f", "-r", "-U", self.base_sock, "file",
                                      str(self.work / "base.raw")])
        wait_for(lambda: os.path.exists(self.base_sock), "nbdkit")

    def stop_base(self) -> None:
        # The storage node dies (nbdkit's own SIGTERM would wait for its
        # clients to leave: not an outage).
        if self.base is not None:
            self.base.kill()
            self.base.wait()
            self.base = None

    def start_daemon(self) -> None:
        self.daemon = subprocess.Popen(
            [PY, "-m", "bootcache", "serve", "--socket", self.sock, "--remote-option",
             f"deadline={self.deadline}", f"{self.cache}=deb"], stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.sock + ".ctl"), "bootcache serve")

    def stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(sig)
            self.daemon.wait()
            self.daemon = None
            for p in (self.sock, self.sock + ".ctl"):
                if sig == signal.SIGKILL and os.path.exists(p):
                    os.unlink(p)

    def reader(self, clusters: list[int], out: Path) -> subprocess.Popen[bytes]:
        args = []
        for k in clusters:
            args += ["-c", f"read -P {k % 251 + 1} {k * CLUSTER} {CLUSTER}"]
        return subprocess.Popen(["qemu-io", "-r", "-f", "raw",
                                 f"nbd+unix:///deb?socket={self.sock}", *args],
                                stdout=out.open("wb"), stderr=subprocess.STDOUT)

    def storm(self, readers: int, rng: random.Random) -> list[tuple[subprocess.Popen[bytes], Path]]:
        out = []
        for i in range(readers):
            order = list(range(self.clusters))
            rng.shuffle(order)
            path = self.work / f"reader{i}.out"
            out.append((self.reader(order[:max(self.clusters // 4, 1)], path), path))
        return out

    def check(self, allow_leaks: bool) -> bool:
        spec = {"driver": "qcow2", "backing": None,
                "file": {"driver": "file", "filename": str(self.cache)}}
        rc = subprocess.run(["qemu-img", "check", "-U", "json:" + json.dumps(spec)],
                            capture_output=True).returncode
        return rc == 0 or (allow_leaks and rc == 3)


def tally(results: list[tuple[subprocess.Popen[bytes], Path]]) -> tuple[int, int]:
    """(wrong bytes seen, reads that failed with EIO) of finished readers."""
    wrong = eio = 0
    for proc, path in results:
        proc.wait()
        text = path.read_text(errors="replace")
        wrong += text.count("Pattern verification failed")
        eio += text.count("Input/output error")
    return wrong, eio


def read_all(node: Node) -> tuple[int, int]:
    path = node.work / "all.out"
    return tally([(node.reader(list(range(node.clusters)), path), path)])


def outage(node: Node, args: argparse.Namespace, rng: random.Random) -> dict[str, int]:
    totals = {"wrong": 0, "corrupt": 0, "eio": 0}
    node.start_base()
    node.start_daemon()
    for r in range(args.rounds):
        storm = node.storm(args.readers, rng)
        node.stop_base()
        time.sleep(args.seconds)  # the outage itself is the experiment's parameter
        node.start_base()
        wrong, eio = tally(storm)
        wrong2, eio2 = read_all(node)
        totals["wrong"] += wrong + wrong2
        totals["eio"] += eio
        if eio2:
            raise SystemExit(f"round {r}: reads failed after the base came back")
        node.stop_daemon()
        ok = node.check(allow_leaks=False)
        totals["corrupt"] += not ok
        print(f"round {r}: outage {args.seconds}s, EIO {eio}, wrong {wrong + wrong2}, "
              f"check {'clean' if ok else 'CORRUPT'}", flush=True)
        # A cold start for the next round: drop what was cached.
        subprocess.run([PY, "-m", "bootcache", "create", "-q", "-f", "qcow2", "--cache-quota",
                        args.quota, "-b", f"nbd+unix:///?socket={node.base_sock}", "-F", "raw",
                        str(node.cache), str(node.size)], check=True)
        node.start_daemon()
    node.stop_daemon()
    node.stop_base()
    return totals


def kill(node: Node, args: argparse.Namespace, rng: random.Random) -> dict[str, int]:
    totals = {"wrong": 0, "corrupt": 0, "eio": 0}
    node.start_base()
    for r in range(args.rounds):
        node.start_daemon()
        storm = node.storm(args.readers, rng)
        time.sleep(rng.uniform(0.05, args.seconds))  # a random moment of the fill
        node.stop_daemon(signal.SIGKILL)
        wrong, _ = tally(storm)  # their reads fail when the daemon dies; never wrong
        ok = node.check(allow_leaks=True)
        node.start_daemon()  # reclaims leaks at open
        wrong2, eio2 = read_all(node)
        node.stop_daemon()
        clean = node.check(allow_leaks=False)
        totals["wrong"] += wrong + wrong2
        totals["corrupt"] += (not ok) + (not clean)
        totals["eio"] += eio2
        print(f"round {r}: killed, wrong {wrong + wrong2}, after kill "
              f"{'ok' if ok else 'CORRUPT'}, after restart {'clean' if clean else 'NOT CLEAN'}",
              flush=True)
    node.stop_base()
    return totals


def sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


class LossyLink:
    """A namespace with nginx at its end of a shaped veth pair."""

    def __init__(self, work: Path) -> None:
        tag = os.getpid() % 10000
        self.ns, self.host_if, self.ns_if = f"bcc{tag}", f"bcc{tag}h", f"bcc{tag}n"
        octet = os.getpid() % 250 + 1
        self.host_ip, self.ns_ip = f"10.214.{octet}.1", f"10.214.{octet}.2"
        self.work = work
        self.nginx: subprocess.Popen[bytes] | None = None
        self.delayer: subprocess.Popen[str] | None = None
        self.shaping = ""

    def up(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        sh("ip", "-n", self.ns, "link", "set", self.ns_if, "up")
        try:
            sh("tc", "qdisc", "add", "dev", self.host_if, "root", "netem", "delay", "50ms",
               "loss", "1%")
            sh("tc", "-n", self.ns, "qdisc", "add", "dev", self.ns_if, "root", "netem",
               "delay", "50ms", "loss", "1%")
            self.shaping = "netem delay 50ms loss 1%"
        except OSError:
            self._delay_by_nfqueue()
            self.shaping = "no netem in this kernel: iptables loss 1% and NFQUEUE delay 50ms"

    def _delay_by_nfqueue(self) -> None:
        # Rules inside the namespace go with it; the delayer is killed in down().
        for chain, way in (("INPUT", "-i"), ("OUTPUT", "-o")):
            sh("ip", "netns", "exec", self.ns, "iptables", "-A", chain, way, self.ns_if, "-m",
               "statistic", "--mode", "random", "--probability", "0.01", "-j", "DROP")
            sh("ip", "netns", "exec", self.ns, "iptables", "-A", chain, way, self.ns_if, "-j",
               "NFQUEUE", "--queue-num", "1")
        self.delayer = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable,
             str(Path(__file__).with_name("link_delay.py")), "--queue", "1", "--delay", "0.05"],
            stdout=subprocess.PIPE, text=True)
        assert self.delayer.stdout is not None
        if self.delayer.stdout.readline().strip() != "ready":
            raise OSError("tools/link_delay.py did not start (is NetfilterQueue installed?)")

    def serve(self, root: Path) -> str:
        prefix = self.work / "nginx"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        temps = "".join(f"{k}_temp_path {prefix}/tmp; " for k in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf.write_text(f"worker_processes 1; user root; error_log {prefix}/error.log; "
                        f"pid {prefix}/nginx.pid; events {{ worker_connections 256; }} "
                        f"http {{ access_log off; {temps} server {{ listen "
                        f"{self.ns_ip}:8080; root {root}; }} }}\n")
        self.nginx = subprocess.Popen(["ip", "netns", "exec", self.ns, "nginx", "-c", str(conf),
                                       "-p", str(prefix), "-g", "daemon off;"])

        def listening() -> bool:
            return subprocess.run(["curl", "-s", "-o", "/dev/null", "-I",
                                   f"http://{self.ns_ip}:8080/"]).returncode == 0
        wait_for(listening, "nginx in the namespace")
        return f"http://{self.ns_ip}:8080/base.raw"

    def rx_bytes(self) -> int:
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/rx_bytes").read_text())

    def down(self) -> None:
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait()
        if self.delayer is not None:
            self.delayer.kill()
            self.delayer.wait()
        subprocess.run(["ip", "link", "del", self.host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], check=False, capture_output=True)


def link(node: Node, args: argparse.Namespace, rng: random.Random) -> dict[str, int]:
    totals = {"wrong": 0, "corrupt": 0, "eio": 0}
    lk = LossyLink(node.work)
    try:
        lk.up()
        www = node.work / "www"
        www.mkdir()
        os.link(node.work / "base.raw", www / "base.raw")
        url = lk.serve(www)
        print(f"link: {lk.shaping}", flush=True)
        for r in range(args.rounds):
            subprocess.run([PY, "-m", "bootcache", "create", "-q", "-f", "qcow2",
                            "--cache-quota", args.quota, "-b", url, "-F", "raw",
                            str(node.cache), str(node.size)], check=True)
            before, start = lk.rx_bytes(), time.monotonic()
            node.start_daemon()
            storm = node.storm(args.readers, rng)
            wrong, eio = tally(storm)
            node.stop_daemon()
            crossed = lk.rx_bytes() - before
            ok = node.check(allow_leaks=False)
            totals["wrong"] += wrong
            totals["eio"] += eio
            totals["corrupt"] += not ok
            print(f"round {r}: {args.readers} readers in {time.monotonic() - start:.1f} s, "
                  f"wrong {wrong}, EIO {eio}, link bytes {crossed} "
                  f"({crossed / node.size:.3f} x the disk), "
                  f"check {'clean' if ok else 'CORRUPT'}", flush=True)
    finally:
        lk.down()
    return totals


def version_byte(version: int, k: int) -> int:
    # Versions v and v+n differ in every cluster while n < 251.
    return (k + 100 * version) % 251 + 1


def write_version(path: Path, version: int, clusters: int) -> None:
    before = int(path.stat().st_mtime) if path.exists() else None
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for k in range(clusters):
            f.write(bytes([version_byte(version, k)]) * CLUSTER)
    # nginx's ETag is size and mtime in whole seconds: a same-size version
    # written within the same second would keep the old ETag.
    if before is not None and int(tmp.stat().st_mtime) <= before:
        os.utime(tmp, (before + 1, before + 1))
    tmp.replace(path)


def request_versions(data: bytes, clusters: int, versions: tuple[int, int]) -> list[int]:
    """The version of each two-cluster request of a reader's output; -1 when a
    request is of neither version or mixes them. Requests a reader never got
    (it stopped at an EIO: zeros, or past the end of its output) are left out."""
    out = []
    for r in range(clusters // 2):
        piece = data[2 * r * CLUSTER:(2 * r + 2) * CLUSTER]
        if len(piece) < 2 * CLUSTER or not piece.strip(b"\0"):
            continue
        found = -1
        for v in versions:
            if piece == b"".join(bytes([version_byte(v, k)]) * CLUSTER
                                 for k in (2 * r, 2 * r + 1)):
                found = v
        out.append(found)
    return out


def replace(node: Node, args: argparse.Namespace, rng: random.Random) -> dict[str, int]:
    totals = {"wrong": 0, "corrupt": 0, "eio": 0}
    www = node.work / "www"
    www.mkdir()
    base = www / "base.raw"
    write_version(base, 0, node.clusters)
    prefix = node.work / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temps = "".join(f"{k}_temp_path {prefix}/tmp; " for k in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(
        f"worker_processes 1; {user} error_log {prefix}/error.log; pid {prefix}/nginx.pid; "
        f"events {{ worker_connections 256; }} http {{ access_log off; {temps} server {{ "
        f"listen 127.0.0.1:{port}; root {www}; }} }}\n")
    nginx = subprocess.Popen(["nginx", "-c", str(prefix / "nginx.conf"), "-p", str(prefix),
                              "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}/base.raw"
    wait_for(lambda: subprocess.run(["curl", "-sfI", "-o", "/dev/null", url]).returncode == 0,
             "nginx")
    try:
        for r in range(args.rounds):
            old, new = r, r + 1
            write_version(base, old, node.clusters)
            subprocess.run([PY, "-m", "bootcache", "create", "-q", "-f", "qcow2",
                            "--cache-quota", args.quota, "--cache-policy", "lru", "-b", url,
                            "-F", "raw", str(node.cache), str(node.size)], check=True)
            node.start_daemon()
            readers = []
            for i in range(args.readers):
                out = node.work / f"copy{i}.raw"
                readers.append((subprocess.Popen(
                    ["nbdcopy", "--connections=1", "--requests=1", "--threads=1",
                     f"--request-size={2 * CLUSTER}", "--no-extents",
                     f"nbd+unix:///deb?socket={node.sock}", str(out)],
                    stderr=subprocess.DEVNULL), out))
            time.sleep(rng.uniform(0, args.seconds))  # a random moment of the storm
            write_version(base, new, node.clusters)
            mixed = backwards = both = noticed = 0
            for proc, out in readers:
                failed = proc.wait() != 0
                totals["eio"] += failed
                seq = request_versions(out.read_bytes() if out.exists() else b"",
                                       node.clusters, (old, new))
                mixed += seq.count(-1)
                backwards += seq != sorted(seq)
                # One client, one version: a reader that met the reset after
                # old bytes gets EIO, never new bytes.
                both += old in seq and new in seq
                noticed += failed or new in seq
            node.stop_daemon()
            spec = {"driver": "qcow2", "backing": None,
                    "file": {"driver": "file", "filename": str(node.cache)}}
            raw = node.work / "held.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec),
                            str(raw)], check=True)
            held = raw.read_bytes()
            # Before the change was noticed the cache held the old version; after
            # a reset, only new clusters. Old ones may remain only if no reader
            # met the change at all.
            stale = sum(1 for k in range(node.clusters)
                        if held[k * CLUSTER] == version_byte(old, k)) if noticed else 0
            ok = node.check(allow_leaks=False)
            totals["wrong"] += mixed + backwards + both + stale
            totals["corrupt"] += not ok
            print(f"round {r}: readers that met the change {noticed}/{args.readers}, "
                  f"mixed requests {mixed}, went back {backwards}, saw both versions {both}, "
                  f"old clusters kept {stale}, check {'clean' if ok else 'CORRUPT'}", flush=True)
    finally:
        nginx.terminate()
        nginx.wait()
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["outage", "kill", "link", "replace"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--readers", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0,
                    help="outage: how long the base is down; kill: latest kill moment")
    ap.add_argument("--size", default="64")
    ap.add_argument("--quota", default="32M")
    ap.add_argument("--deadline", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bcchaos", dir="/tmp"))
    policy = "lru" if args.scenario == "kill" else "stop"
    node = Node(work, int(args.size) << 20, args.quota, policy, args.deadline)
    try:
        run = {"outage": outage, "kill": kill, "link": link, "replace": replace}[args.scenario]
        totals = run(node, args, rng)
    finally:
        node.stop_daemon(signal.SIGKILL)
        node.stop_base()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.scenario}: {args.rounds} rounds, seed {args.seed}: wrong bytes "
          f"{totals['wrong']}, corrupt images {totals['corrupt']}, reads failed with EIO "
          f"{totals['eio']}")
    if totals["wrong"] or totals["corrupt"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
