"""The base object replaced while clients read it through ``bootcache serve``
(issue 9, item 2: a base replaced while VMs boot from it).

What the design promises (docs/design.md, "A changing base"), and so what
is tested here, for an HTTP base whose ETag changes:

1. Every read request returns bytes of one version only, never part old,
   part new (a request half served from cached old clusters and half
   fetched after the change included).
2. Once a read has returned bytes of the new version, no read that starts
   later returns bytes of the old one: a client's sequence of reads goes
   old... new..., never back.
3. With on_stale=refuse no byte of the new version is ever served: reads
   get old bytes until the change is noticed, then EIO.
4. Afterwards the cache passes ``qemu-img check`` and holds only clusters
   of the version it was reset to (none of the old one).

5. A client (one NBD connection: a VM's disk) never gets both versions:
   once the cache is reset under it, its requests fail with EIO, and a
   client that connects afterwards reads the new version.

Before the change is noticed, old bytes are served: a warm cache notices
within the version check interval (5 s), a miss at once (If-Match).

Readers are nbdcopy processes issuing one request at a time of two
clusters: half the clusters are warm before the change, so each request
straddles a cached (old) and a cold cluster.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from cache.conftest import CLUSTER, QEMU_IMG, MiB, bootcache, run, wait_for
from sources.conftest import NginxServer

SIZE = 16 * MiB
CLUSTERS = SIZE // CLUSTER
REQUEST = 2 * CLUSTER
Storm = list[tuple[subprocess.Popen[bytes], Path]]


def version_byte(version: int, k: int) -> int:
    """The byte filling cluster k of the base's version 1 or 2 (never equal)."""
    return (k + (0 if version == 1 else 100)) % 251 + 1


def version_image(version: int) -> bytes:
    return b"".join(bytes([version_byte(version, k)]) * CLUSTER for k in range(CLUSTERS))


@pytest.fixture
def nginx(tmp_path: Path) -> Any:
    server = NginxServer(tmp_path / "storage")
    server.put("base.raw", version_image(1))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def versions_of_requests(data: bytes) -> list[int | None]:
    """The version of each request-sized piece a reader wrote (None: not read).

    A piece must be wholly one version; anything else fails the test."""
    data = data.ljust(SIZE, b"\0")
    out: list[int | None] = []
    for r in range(SIZE // REQUEST):
        piece = data[r * REQUEST:(r + 1) * REQUEST]
        if piece == bytes(REQUEST):
            out.append(None)  # the reader stopped (EIO) before this request
            continue
        found = [v for v in (1, 2)
                 if piece == b"".join(bytes([version_byte(v, k)]) * CLUSTER
                                      for k in range(2 * r, 2 * r + 2))]
        assert found, (f"request at {r * REQUEST:#x} is neither version: clusters hold "
                       f"{[piece[i * CLUSTER] for i in range(2)]} (v1 "
                       f"{[version_byte(1, k) for k in (2 * r, 2 * r + 1)]}, v2 "
                       f"{[version_byte(2, k) for k in (2 * r, 2 * r + 1)]})")
        out.append(found[0])
    return out


def nbdcopy(uri: str, out: Path) -> subprocess.Popen[bytes]:
    # One connection, one request at a time, in order: the output is the
    # client's sequence of reads.
    return subprocess.Popen(["nbdcopy", "--connections=1", "--requests=1", "--threads=1",
                             f"--request-size={REQUEST}", "--no-extents", uri, str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_read_ok(out: bytes, reads: int = 1) -> None:
    """qemu-io output of reads that all completed with the expected bytes
    (a read -P that fails its pattern still reports the read)."""
    assert b"Pattern verification failed" not in out, out[-2000:]
    assert out.count(b"read 65536/65536") == reads, out[-2000:]


def cache_stats(d: Any) -> dict[str, Any]:
    stats = json.loads(d.ctl("stats", "deb", "--output", "json").stdout)
    (cache,) = stats["caches"].values()
    return dict(cache)


def cached_content(cache: Path) -> bytes:
    """The cache's own clusters (unallocated ones read as zeros)."""
    spec = {"driver": "qcow2", "backing": None,
            "file": {"driver": "file", "filename": str(cache)}}
    raw = cache.with_suffix(".content")
    run([QEMU_IMG, "convert", "-U", "-O", "raw", "json:" + json.dumps(spec), str(raw)])
    return raw.read_bytes()


def assert_holds_only(cache: Path, version: int) -> None:
    """Every cluster the cache holds is of this version of the base (clusters
    it does not hold read as zeros)."""
    held = cached_content(cache)
    image = version_image(version)
    for k in range(CLUSTERS):
        got = held[k * CLUSTER:(k + 1) * CLUSTER]
        assert got == bytes(CLUSTER) or got == image[k * CLUSTER:(k + 1) * CLUSTER], \
            f"cluster {k} holds {got[0]}, not version {version}'s {version_byte(version, k)}"


def assert_clean(cache: Path) -> None:
    spec = {"driver": "qcow2", "backing": None,
            "file": {"driver": "file", "filename": str(cache)}}
    proc = run([QEMU_IMG, "check", "-U", "json:" + json.dumps(spec)], check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert bootcache("check", cache, check=False).returncode == 0


def start_storm(tmp_path: Path, nginx: NginxServer, daemons: Any, on_stale: str,
                readers: int, policy: str = "stop") -> tuple[Any, Path, Storm]:
    """Warm the even clusters, start the readers, replace the base while they
    are in the middle of the disk."""
    cache = tmp_path / "cache.qcow2"
    quota = "100M" if policy == "stop" else "4M"  # lru: evicting all along
    bootcache("create", "-q", "-f", "qcow2", "--cache-quota", quota, "--cache-policy", policy,
              "--cache-on-stale", on_stale, "-b", nginx.url("base.raw"), "-F", "raw", cache,
              str(SIZE))
    d = daemons(f"{cache}=deb")
    uri = d.uri("deb")
    warm = [f"read -P {version_byte(1, k)} {k * CLUSTER} {CLUSTER}"
            for k in range(0, CLUSTERS, 2)]
    proc = run(["qemu-io", "-r", "-f", "raw", uri, *[a for c in warm for a in ("-c", c)]])
    assert_read_ok(proc.stdout, len(warm))
    storm = []
    for i in range(readers):
        out = tmp_path / f"reader{i}.raw"
        storm.append((nbdcopy(uri, out), out))
    # Stop every reader once the first is a quarter of the way in (none at
    # the end: the clusters past them are still cold), replace, resume.
    first, first_out = storm[0]
    wait_for(lambda: (first_out.exists() and first_out.stat().st_blocks * 512 >= SIZE // 4)
             or first.poll() is not None, 60, "the first reader's progress")
    for proc, _ in storm:
        proc.send_signal(signal.SIGSTOP)
    try:
        assert all(proc.poll() is None for proc, _ in storm), \
            "a reader ended before the replacement"
        nginx.put("base.raw", version_image(2))
    finally:
        for proc, _ in storm:
            proc.send_signal(signal.SIGCONT)
    return d, cache, storm


@pytest.mark.parametrize("policy", ["stop", "lru"])
def test_base_replaced_under_readers_reset(tmp_path: Path, nginx: NginxServer,
                                           daemons: Any, policy: str) -> None:
    d, cache, storm = start_storm(tmp_path, nginx, daemons, "reset", readers=4, policy=policy)
    for proc, out in storm:
        _, err = proc.communicate(timeout=300)
        seq = versions_of_requests(out.read_bytes())  # promise 1, per request
        # Promise 5: every reader read old bytes before the change, so after
        # the reset it gets EIO, never a byte of the new version.
        assert seq[0] == 1 and 2 not in seq, f"{out.name}: {seq}"
        assert proc.returncode != 0 and None in seq, f"{out.name} read past the reset: {seq}"
        assert b"Input/output error" in err, err.decode()
    # Reads starting after the reset see only the new version.
    assert cache_stats(d)["resets"] == 1
    after = tmp_path / "after.raw"
    proc = nbdcopy(d.uri("deb"), after)
    assert proc.wait(120) == 0
    assert set(versions_of_requests(after.read_bytes())) == {2}
    assert d.stop() == 0
    # Promise 4: clean, and every cluster held is of the new version.
    assert_clean(cache)
    assert_holds_only(cache, 2)


def test_base_replaced_under_readers_refuse(tmp_path: Path, nginx: NginxServer,
                                            daemons: Any) -> None:
    d, cache, storm = start_storm(tmp_path, nginx, daemons, "refuse", readers=4)
    refused = 0
    for proc, out in storm:
        proc.communicate(timeout=300)
        seq = versions_of_requests(out.read_bytes()) if out.exists() else []
        # Promise 3: old bytes, then nothing; never a byte of the new version.
        assert 2 not in seq, f"{out.name} was served the new version: {seq}"
        refused += proc.returncode != 0
    assert refused == len(storm), "a reader read past the change without meeting the refusal"
    first = versions_of_requests(storm[0][1].read_bytes())
    assert first[0] == 1 and first[-1] is None
    # The refusal holds for every later reader too, and is reported.
    late = subprocess.run(["qemu-io", "-r", "-f", "raw", d.uri("deb"), "-c",
                           f"read 0 {CLUSTER}"], capture_output=True, text=True, timeout=60)
    assert "Input/output error" in late.stdout + late.stderr, late.stdout
    assert "refusing (on_stale=refuse)" in d.log()
    assert d.stop() == 0
    assert_clean(cache)
    assert_holds_only(cache, 1)


def test_fetch_from_before_the_change_is_not_joined_after_it(tmp_path: Path,
                                                            daemons: Any) -> None:
    """Promise 2 against a slow link: a fetch sent before the replacement is
    still streaming old bytes when the change is noticed and the cache reset;
    a read after the reset of a cluster that fetch covers gets the new version
    (it must not wait for the old fetch and take its bytes)."""
    nginx = NginxServer(tmp_path / "storage", slow_rate="32k")  # 64 KiB in 2 s
    nginx.put("base.raw", version_image(1))
    nginx.start()
    try:
        cache = tmp_path / "cache.qcow2"
        bootcache("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b",
                  nginx.url("base.raw", "slow"), "-F", "raw", cache, str(SIZE))
        d = daemons(f"{cache}=deb", "--remote-option", "timeout=60",
                    "--remote-option", "deadline=120")
        uri = d.uri("deb")
        # Eight cold clusters in one request: one GET of 512 KiB, about 16 s.
        old = subprocess.Popen(["qemu-io", "-r", "-f", "raw", uri, "-c",
                                f"read {8 * CLUSTER} {8 * CLUSTER}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: cache_stats(d)["fetches_in_flight"] == 8, 60,
                     "the long fetch to start")
            nginx.put("base.raw", version_image(2))
            # A miss elsewhere meets the new ETag: the cache is reset.
            first_new = run(["qemu-io", "-r", "-f", "raw", uri, "-c",
                             f"read -P {version_byte(2, 40)} {40 * CLUSTER} {CLUSTER}"])
            assert_read_ok(first_new.stdout)
            assert cache_stats(d)["resets"] == 1
            assert old.poll() is None, "the old fetch ended before the reset: too fast a link"
            # A cluster the old fetch is still bringing: the new version only.
            later = run(["qemu-io", "-r", "-f", "raw", uri, "-c",
                         f"read -P {version_byte(2, 11)} {11 * CLUSTER} {CLUSTER}"],
                        check=False)
            assert_read_ok(later.stdout)
            assert old.wait(120) == 0, (old.stdout.read() if old.stdout else b"", d.log())
        finally:
            old.kill()
        assert d.stop() == 0
        assert_clean(cache)
        assert_holds_only(cache, 2)
    finally:
        nginx.stop()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
@pytest.mark.parametrize("on_stale", ["reset", "refuse"])
def test_qemu_disk_across_replacement(tmp_path: Path, nginx: NginxServer, daemons: Any,
                                      on_stale: str) -> None:
    """A running QEMU with the export as a disk (its own NBD client), read by
    qemu-io inside QEMU: it never gets a byte of the new version after old
    ones. Under reset, a disk added afterwards reads the new version."""
    from vm.conftest import Vm

    cache = tmp_path / "cache.qcow2"
    bootcache("create", "-q", "-f", "qcow2", "--cache-quota", "100M", "--cache-on-stale",
              on_stale, "-b", nginx.url("base.raw"), "-F", "raw", cache, str(SIZE))
    d = daemons(f"{cache}=deb")
    vmdir = Path(tempfile.mkdtemp(prefix="bcvm", dir="/tmp"))  # short socket paths
    vm = Vm(vmdir, "vm")
    try:
        vm.qmp("blockdev-add", **{"driver": "raw", "node-name": "disk", "read-only": True,
                                  "file": {"driver": "nbd", "export": "deb",
                                           "server": {"type": "unix", "path": d.sock}}})

        def qemu_io(command: str, node: str = "disk") -> str:
            start = vm.log.stat().st_size
            vm.qmp("human-monitor-command", **{"command-line": f'qemu-io {node} "{command}"'})

            def output() -> str:
                return vm.log.read_bytes()[start:].decode(errors="replace")

            wait_for(lambda: "bytes at offset" in output() or "error" in output().lower(), 60,
                     f"qemu-io {command!r}")
            return output()

        def read(k: int, version: int, node: str = "disk") -> str:
            return qemu_io(f"read -P {version_byte(version, k)} {k * CLUSTER} {CLUSTER}", node)

        for k in range(4):
            out = read(k, 1)
            assert "Pattern verification failed" not in out and "error" not in out.lower(), out
        nginx.put("base.raw", version_image(2))
        for k in (40, 0, 1):  # a miss (it meets the new ETag), then clusters cached before
            out = read(k, 2)
            assert f"read {CLUSTER}/{CLUSTER}" not in out, out
            assert "Input/output error" in out, out
        if on_stale == "reset":
            # The cache was reset: a disk attached now (a new client) reads
            # the new version, old clusters included.
            assert cache_stats(d)["resets"] == 1
            vm.qmp("blockdev-add", **{"driver": "raw", "node-name": "disk2", "read-only": True,
                                      "file": {"driver": "nbd", "export": "deb",
                                               "server": {"type": "unix", "path": d.sock}}})
            for k in (40, 0, 1, 2, 3):
                out = read(k, 2, "disk2")
                assert "Pattern verification failed" not in out, out
                assert "error" not in out.lower(), out
    finally:
        vm.stop()
        shutil.rmtree(vmdir, ignore_errors=True)
    assert d.stop() == 0
    assert_clean(cache)
