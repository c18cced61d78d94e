"""One daemon with many exports: start time, memory, idle CPU, connections.

    .venv/bin/python bench/node_scale.py [--exports 1000] [--connections 200]

Makes N cache images (copies of one empty cache over a shared raw base) and
a node config naming them all, starts ``bootcache serve --config``, and
measures:

- start: from exec to the control socket answering ``list``;
- RSS after start, after one read on every export, and after N connections
  were opened and closed again (nothing per connection may stay);
- CPU used while idle for ``--idle`` seconds (utime+stime from /proc).

The goals (issue 10): start <= 2 s, RSS <= 100 MB, about 0% CPU idle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
CLK = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def ctl_list(control: str) -> bool:
    """One GET /v1/exports; True when the daemon answered 200."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(control)
            s.sendall(b"GET /v1/exports HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
    except OSError:
        return False
    return head.startswith(b"HTTP/1.1 200")


def nbd_open(sock: str, name: str) -> socket.socket:
    """Fixed-newstyle handshake up to NBD_OPT_GO for ``name`` (no reads)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.recv(18)  # NBDMAGIC, IHAVEOPT, handshake flags
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
    while True:
        hdr = b""
        while len(hdr) < 20:
            hdr += s.recv(20 - len(hdr))
        _, _, rtype, length = struct.unpack(">QIII", hdr)
        payload = b""
        while len(payload) < length:
            payload += s.recv(length - len(payload))
        if rtype == 1:  # NBD_REP_ACK
            return s
        if rtype & 0x80000000:
            raise RuntimeError(f"{name}: refused ({rtype:#x})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exports", type=int, default=1000)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--idle", type=float, default=10.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bcscale", dir="/tmp"))
    try:
        run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> None:
    n = args.exports
    with open(work / "base.raw", "wb") as f:
        f.truncate(64 << 20)
        f.write(os.urandom(1 << 20))
    subprocess.run([PY, "-m", "bootcache", "create", "-q", "-f", "qcow2", "--cache-quota",
                    "32M", "-b", "base.raw", "-F", "raw", str(work / "c0.qcow2")], check=True)
    lines = ["[server]", f'socket = "{work}/n.sock"', "", "[backing]", f'dirs = ["{work}"]', ""]
    for i in range(n):
        if i:
            shutil.copyfile(work / "c0.qcow2", work / f"c{i}.qcow2")
        lines += ["[[export]]", f'image = "{work}/c{i}.qcow2"', f'name = "e{i}"', ""]
    (work / "node.toml").write_text("\n".join(lines))
    sock, control = f"{work}/n.sock", f"{work}/n.sock.ctl"
    t0 = time.monotonic()
    proc = subprocess.Popen([PY, "-m", "bootcache", "serve", "--config", str(work / "node.toml")],
                            stderr=subprocess.DEVNULL)
    try:
        while not ctl_list(control):
            if proc.poll() is not None:
                raise SystemExit("bootcache serve exited")
            time.sleep(0.005)
        start = time.monotonic() - t0
        rss_start = rss_mb(proc.pid)
        cpu0, w0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle)
        idle = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - w0) * 100
        # One client per export in turn (a cold read each through nbdcopy would
        # be slow to start; the handshake opens the export's whole path).
        conns = [nbd_open(sock, f"e{i % n}") for i in range(args.connections)]
        rss_open = rss_mb(proc.pid)
        for c in conns:
            c.close()
        for round_ in range(3):  # again: what a connection takes must come back
            conns = [nbd_open(sock, f"e{i % n}") for i in range(args.connections)]
            for c in conns:
                c.close()
            del round_
        while not ctl_list(control):
            time.sleep(0.01)
        rss_after = rss_mb(proc.pid)
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
        stop = time.monotonic() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"exports: {n}")
    print(f"start to answering: {start:.2f} s (goal <= 2 s)")
    print(f"RSS after start: {rss_start:.1f} MB (goal <= 100 MB)")
    print(f"idle CPU over {args.idle:.0f} s: {idle:.2f}% of a core (goal ~0%)")
    print(f"RSS with {args.connections} clients connected: {rss_open:.1f} MB")
    print(f"RSS after 4 x {args.connections} clients came and went: {rss_after:.1f} MB")
    print(f"SIGTERM to exit: {stop:.2f} s (exit {rc})")


if __name__ == "__main__":
    main()
