"""``bootcache trace record`` and ``trace replay`` with real NBD clients."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootcache.storm import trace

BC = [sys.executable, "-m", "bootcache"]
pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io missing")


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(dir="/tmp", prefix="bct-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_for(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)


def test_record_then_replay(tmp_path: Path, sockdir: str) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(4 << 20))
    out = tmp_path / "boot.trace"
    sock = os.path.join(sockdir, "rec.sock")
    rec = subprocess.Popen([*BC, "trace", "record", "--socket", sock, "-o", str(out),
                            f"{image}=disk"], stderr=subprocess.PIPE)
    try:
        wait_for(sock, rec)
        reads = [(0, 512), (1 << 20, 65536), (3 << 20, 4096), (12345, 1000)]
        cmds = [a for off, n in reads for a in ("-c", f"read {off} {n}")]
        subprocess.run(["qemu-io", "-r", "-f", "raw", *cmds,
                        f"nbd+unix:///disk?socket={sock}"], check=True, capture_output=True)
    finally:
        rec.send_signal(signal.SIGTERM)
        assert rec.wait(timeout=20) == 0
    tr = trace.load(str(out))
    assert [(r.offset, r.length) for r in tr.requests] == reads
    assert all(a.time <= b.time for a, b in zip(tr.requests, tr.requests[1:], strict=False))

    # Replay the recorded trace from 3 VMs against bootcache serve.
    sock2 = os.path.join(sockdir, "srv.sock")
    srv = subprocess.Popen([*BC, "serve", "--read-only", "--socket", sock2, f"{image}=disk"],
                           stderr=subprocess.PIPE)
    try:
        wait_for(sock2, srv)
        res = subprocess.run([*BC, "trace", "replay", f"nbd+unix:///disk?socket={sock2}",
                              str(out), "-n", "3"], check=True, capture_output=True, text=True)
        assert res.stdout.startswith("3 VMs:"), res.stdout
        read_mib = sum(n for _, n in reads) * 3 / 2**20
        assert f"{read_mib:.1f} MiB read" in res.stdout
    finally:
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(timeout=20) == 0


def test_stats_counts_what_the_trace_holds(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    path.write_text("# comment\n0.0 0 4096\n0.1 4096 4096\n0.2 65536 131072\n0.3 0 512\n")
    res = subprocess.run([*BC, "trace", "stats", str(path)], check=True, capture_output=True,
                         text=True)
    lines = res.stdout.splitlines()
    assert lines[0] == f"{path}: 4 reads over 0.3 s"
    # 4096 + 4096 + 131072 + 512 bytes; blocks 0, 1 and 16..47 at 4 KiB; 0, 1, 2 at 64 KiB.
    assert lines[1] == f"read: {(4096 * 2 + 131072 + 512) / 2**20:.1f} MiB"
    assert lines[2] == (f"distinct: {34 * 4096 / 2**20:.1f} MiB at 4 KiB, "
                        f"{3 * 65536 / 2**20:.1f} MiB at 64 KiB")
    assert lines[4] == "request sizes: 4 KiB (2), 512 B (1), 128 KiB (1)"  # ties: smaller first


@pytest.mark.parametrize("name", sorted(trace.SHIPPED))
def test_every_shipped_trace_loads_by_name(name: str) -> None:
    tr = trace.shipped(name)
    assert tr.name == trace.SHIPPED[name]
    assert len(tr.requests) > 100
    assert tr.requests[0].time == 0.0
    assert all(a.time <= b.time for a, b in zip(tr.requests, tr.requests[1:], strict=False))


def test_an_unknown_shipped_name_is_refused_with_the_list() -> None:
    res = subprocess.run([*BC, "trace", "stats", "no-such-trace"], capture_output=True,
                         text=True)
    assert res.returncode != 0
    assert "no-such-trace" in res.stderr

