"""Faults at node scale, short versions for CI (issue 9, item 2; the long
runs are tools/chaos.py): the storage node goes away under a storm of
readers reading through ``bootcache serve``.

The base is an HTTP object on a real nginx; readers are qemu-io processes
whose every read checks its bytes (the base's cluster k holds the byte
k % 251 + 1). No wrong byte may ever come back; reads wait out an outage
shorter than the source's deadline and fail with EIO after it; the daemon
keeps serving afterwards without a restart, and the cache stays clean.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cache.conftest import CLUSTER, QEMU_IMG, QEMU_IO, MiB, bootcache, pattern_base, run
from sources.conftest import NginxServer

SIZE = 8 * MiB
CLUSTERS = SIZE // CLUSTER


@pytest.fixture
def nginx_base(tmp_path: Path) -> Any:
    server = NginxServer(tmp_path / "storage")
    base = pattern_base(tmp_path / "guest.raw", SIZE)
    server.put("base.raw", base)
    server.start()
    try:
        yield server, base
    finally:
        server.stop()


def make_cache(tmp_path: Path, url: str) -> Path:
    cache = tmp_path / "cache.qcow2"
    bootcache("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b", url, "-F", "raw",
              cache, str(SIZE))
    return cache


def reads(base: bytes, clusters: range | list[int]) -> list[str]:
    out = []
    for k in clusters:
        out += ["-c", f"read -P {base[k * CLUSTER]} {k * CLUSTER} {CLUSTER}"]
    return out


def qemu_io(uri: str, args: list[str], out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([QEMU_IO, "-r", "-f", "raw", uri, *args],
                            stdout=out.open("wb"), stderr=subprocess.STDOUT)


def source_stats(d: Any) -> dict[str, Any]:
    stats = json.loads(d.ctl("stats", "deb", "--output", "json").stdout)
    (cache,) = stats["caches"].values()
    return dict(cache["source"])


def wait_until(cond: Any, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.05)


def assert_qemu_check(cache: Path) -> None:
    """qemu-img check of the cache alone (this QEMU cannot open an http base)."""
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file",
                                                          "filename": str(cache)}}
    proc = run([QEMU_IMG, "check", "-U", "--output", "json", "json:" + json.dumps(spec)],
               check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def check_no_wrong_bytes(out: str) -> None:
    assert "Pattern verification failed" not in out, out[-2000:]


def test_outage_inside_the_deadline_is_waited_out(tmp_path: Path, nginx_base: Any,
                                                 daemons: Any) -> None:
    server, base = nginx_base
    cache = make_cache(tmp_path, server.url("base.raw"))
    d = daemons(f"{cache}=deb", "--remote-option", "deadline=120")
    uri = d.uri("deb")
    half = CLUSTERS // 2
    warm = subprocess.run([QEMU_IO, "-r", "-f", "raw", uri, *reads(base, range(half))],
                          capture_output=True, text=True, timeout=120)
    assert warm.returncode == 0 and warm.stdout.count("read 65536/65536") == half, warm.stdout
    server.stop()
    # A storm of readers of the cold half, all stuck behind the dead base.
    cold = list(range(half, CLUSTERS))
    storm = [qemu_io(uri, reads(base, cold[i::4]), tmp_path / f"r{i}.out") for i in range(4)]
    try:
        wait_until(lambda: source_stats(d)["errors"] > 0, "no reader reached the dead base")
        # The warm half is served all the while.
        hits = subprocess.run([QEMU_IO, "-r", "-f", "raw", uri, *reads(base, range(half))],
                              capture_output=True, text=True, timeout=60)
        assert hits.returncode == 0 and hits.stdout.count("read 65536/65536") == half
        assert all(r.poll() is None for r in storm), "a cold read finished without the base"
        server.start()
        for i, r in enumerate(storm):
            assert r.wait(120) == 0
            out = (tmp_path / f"r{i}.out").read_text()
            check_no_wrong_bytes(out)
            assert out.count("read 65536/65536") == len(cold[i::4]), out[-2000:]
    finally:
        for r in storm:
            r.kill()
    assert source_stats(d)["retries"] > 0
    again = subprocess.run([QEMU_IO, "-r", "-f", "raw", uri, *reads(base, range(CLUSTERS))],
                           capture_output=True, text=True, timeout=120)
    assert again.stdout.count("read 65536/65536") == CLUSTERS, again.stdout[-2000:]
    assert d.stop() == 0
    assert_qemu_check(cache)
    assert bootcache("check", cache, check=False).returncode == 0


def test_outage_past_the_deadline_fails_with_eio_then_recovers(
        tmp_path: Path, nginx_base: Any, daemons: Any) -> None:
    server, base = nginx_base
    cache = make_cache(tmp_path, server.url("base.raw"))
    d = daemons(f"{cache}=deb", "--remote-option", "deadline=2",
                "--remote-option", "timeout=1")
    uri = d.uri("deb")
    assert subprocess.run([QEMU_IO, "-r", "-f", "raw", uri, *reads(base, range(8))],
                          capture_output=True, timeout=60).returncode == 0
    server.stop()
    failed = subprocess.run([QEMU_IO, "-r", "-f", "raw", uri, *reads(base, range(8, 16))],
                            capture_output=True, text=True, timeout=120)
    check_no_wrong_bytes(failed.stdout)
    assert "Input/output error" in failed.stdout, failed.stdout[-2000:]
    assert "read 65536/65536" not in failed.stdout
    assert source_stats(d)["failures"] > 0
    server.start()
    # The same daemon serves the same clusters once the base is back.
    ok = subprocess.run([QEMU_IO, "-r", "-f", "raw", uri, *reads(base, range(CLUSTERS))],
                        capture_output=True, text=True, timeout=120)
    check_no_wrong_bytes(ok.stdout)
    assert ok.stdout.count("read 65536/65536") == CLUSTERS, ok.stdout[-2000:]
    assert d.stop() == 0
    assert_qemu_check(cache)
