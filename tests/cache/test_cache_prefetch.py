"""Issue 12, item 2: prefetch from the boot profile, in `bootcache serve` and
`bootcache cache warm`.

The base is served by nbdkit behind its rate filter (a link slow enough
that a prefetch is still running while the test acts) and its log filter,
whose log is the oracle for what crossed the link. Readers are qemu-img and
qemu-io over the daemon's NBD export; the base file says what every byte
must be; qemu-img check judges the cache afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bootcache.layers.chain import open_layer
from bootcache.layers.prefetch import Prefetcher

from .conftest import (
    CLUSTER,
    NBDKIT,
    QEMU_IMG,
    QEMU_IO,
    KiB,
    MiB,
    assert_qemu_check,
    cached_clusters,
    child_env,
    make_base,
    run,
    wait_for,
)
from .conftest import bootcache as bootcache_cli

SAMPLES = 8 * 4096  # the identity's sampled blocks (spec section 5), read at each open


@dataclass
class LoggedRead:
    connection: str
    offset: int
    length: int
    begin: int  # line numbers in nbdkit's log
    end: int

    def open_at(self, line: int) -> bool:
        return self.begin < line and (line < self.end or self.end < 0)


class SlowBase:
    """nbdkit --filter=log --filter=rate file BASE: the storage node and its link.

    The log filter is the outer one (the first named is nearest the client):
    a read begins in its log when it arrives, before the link's delay, which
    ``burstiness`` seconds of credit (nbdkit's default: 2) let reads skip."""

    def __init__(self, base: Path, sockdir: str, rate: str,
                 burstiness: float | None = None) -> None:
        self.sock = os.path.join(sockdir, "base.sock")
        self.log = Path(sockdir) / "base.log"
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.proc = subprocess.Popen(
            [NBDKIT, "-f", "--exit-with-parent", "-U", self.sock, "-r", "--filter=log",
             "--filter=rate", "file", os.fspath(base), f"logfile={self.log}", f"rate={rate}",
             *([f"burstiness={burstiness}"] if burstiness is not None else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.sock), 10, "nbdkit")

    def reads(self) -> list[tuple[int, int]]:
        text = self.log.read_text() if self.log.exists() else ""
        wait_for(lambda: self.log.read_text().count(" Read id=")
                 == self.log.read_text().count("...Read id="), 10, "nbdkit log")
        out = []
        for line in text.splitlines():
            if " Read id=" in line and "...Read" not in line:
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                out.append((int(fields["offset"], 16), int(fields["count"], 16)))
        return out

    def timeline(self, finished: bool = True) -> list[LoggedRead]:
        """Every read in the order nbdkit received them, with the log lines
        where each began and ended (its reply was made; -1: not yet) and its
        connection. ``finished``: wait until every read begun has ended."""
        if finished:
            wait_for(lambda: self.log.read_text().count(" Read id=")
                     == self.log.read_text().count("...Read id="), 10, "nbdkit log")
        begun: dict[tuple[str, str], LoggedRead] = {}
        out = []
        for i, line in enumerate(self.log.read_text().splitlines()):
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            key = (fields.get("connection", ""), fields.get("id", ""))
            if " Read id=" in line and "...Read" not in line:
                read = LoggedRead(key[0], int(fields["offset"], 16), int(fields["count"], 16),
                                  i, -1)
                begun[key] = read
                out.append(read)
            elif "...Read id=" in line:
                begun.pop(key).end = i
        return out

    def cluster_reads(self) -> Counter[int]:
        """How often each cluster crossed the link (sample reads excluded: < 1 cluster)."""
        counts: Counter[int] = Counter()
        for off, n in self.reads():
            if n >= CLUSTER:
                counts.update(range(off // CLUSTER, (off + n) // CLUSTER))
        return counts

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Daemon:
    """bootcache serve over one cache image, with its control socket."""

    def __init__(self, cache: Path, sockdir: str, *extra: str, images: bool = True) -> None:
        """``images`` False: the cache is exported by the --config file given in
        ``extra``, not on the command line."""
        self.sock = os.path.join(sockdir, "bc.sock")
        self.ctl = self.sock + ".ctl"
        self.uri = f"nbd+unix:///c?socket={self.sock}"
        self.cache = cache
        self.logpath = cache.with_suffix(".serve.log")
        with open(self.logpath, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bootcache", "serve", "-v", "--socket", self.sock,
                 *extra, *([f"{cache}=c"] if images else [])],
                stdout=log, stderr=subprocess.STDOUT, env=child_env())
        wait_for(lambda: os.path.exists(self.ctl) or self.proc.poll() is not None, 30, "serve")
        assert self.proc.poll() is None, self.logpath.read_text()

    def stats(self) -> dict[str, Any]:
        doc = json.loads(bootcache_cli("ctl", "--control", self.ctl, "stats", "c",
                                       "--output", "json").stdout)
        caches: dict[str, Any] = doc["caches"]
        return next(iter(caches.values()))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        assert self.proc.wait(30) == (0 if sig == signal.SIGTERM else -sig), \
            self.logpath.read_text()


def qemu_io_read(uri: str, offset: int, length: int) -> bytes:
    """Bytes read by qemu-io (its hex dump, parsed)."""
    out = run([QEMU_IO, "-f", "raw", "-r", "-c", f"read -v {offset} {length}", uri]).stdout
    data = bytearray()
    for line in out.decode().splitlines():
        if line[:8].isalnum() and line[8:10] == ": ":
            data += bytes.fromhex(line[10:10 + 48])
    return bytes(data)


def profile_trace(path: Path, clusters: list[int]) -> None:
    """A boot trace that reads ``clusters`` in this order (4 KiB each)."""
    path.write_text("".join(f"{i * 0.01:.2f} {ci * CLUSTER + 512} 4096\n"
                            for i, ci in enumerate(clusters)))


def create_profiled_cache(cache: Path, base_uri: str, trace: Path, quota: str = "100M") -> None:
    bootcache_cli("create", "-q", "-f", "qcow2", "--cache-quota", quota, "-b", base_uri,
                  "-F", "raw", "--cache-profile", trace, cache)


@pytest.fixture
def storage(tmp_path: Path, sockdir: str) -> Iterator[tuple[Path, bytes, str]]:
    """A 16 MiB random base; yields (folder, its bytes, sockdir)."""
    base = make_base(tmp_path / "base.raw", 16 * MiB, seed=77)
    yield tmp_path, base, sockdir


def test_prefetch_during_a_reader_storm_serves_correct_bytes_once(
        storage: tuple[Path, bytes, str]) -> None:
    tmp, base, sockdir = storage
    link = SlowBase(tmp / "base.raw", sockdir, rate="16M")  # 16 MiB: about 8 s
    try:
        order = list(range(256))
        random.Random(1).shuffle(order)
        profile_trace(tmp / "boot.trace", order)
        cache = tmp / "cache.qcow2"
        create_profiled_cache(cache, link.uri, tmp / "boot.trace")
        daemon = Daemon(cache, sockdir)
        try:
            wait_for(lambda: daemon.stats()["prefetched_bytes"] > 0, 30, "prefetch start")
            before = daemon.stats()["prefetched_bytes"]
            assert before < len(base) * 3 // 4, "the prefetch is too far on for a storm"
            # Four qemu-img readers copy the whole disk while the prefetch runs.
            outs = [tmp / f"out{k}.raw" for k in range(4)]
            readers = [subprocess.Popen([QEMU_IMG, "convert", "-f", "raw", "-O", "raw",
                                         daemon.uri, out]) for out in outs]
            assert all(r.wait(120) == 0 for r in readers)
            for out in outs:
                assert out.read_bytes() == base, f"{out.name}: wrong bytes"
            wait_for(lambda: daemon.stats()["fetches_in_flight"] == 0, 30, "fetches done")
            stats = daemon.stats()
            assert stats["bytes_from_base"] == len(base)
            assert 0 < stats["prefetched_bytes"] < len(base)  # readers fetched the rest
        finally:
            daemon.stop()
        # Demand and prefetch share single flight: each cluster crossed the link once.
        counts = link.cluster_reads()
        assert set(counts) == set(range(256)) and set(counts.values()) == {1}, counts
        assert_qemu_check(cache)
    finally:
        link.stop()


def test_prefetch_ramps_up_one_request_at_a_time_while_nobody_reads(
        tmp_path: Path, sockdir: str) -> None:
    """With no reader, the prefetch starts with one small request at a time,
    grows it step by step, and only then runs two large requests at once."""
    make_base(tmp_path / "base.raw", 64 * MiB, seed=78)
    link = SlowBase(tmp_path / "base.raw", sockdir, rate="128M", burstiness=0.05)
    try:
        order = list(range(16, 16 + 768))  # one run of 48 MiB: longer than the ramp
        profile_trace(tmp_path / "boot.trace", order)
        cache = tmp_path / "cache.qcow2"
        create_profiled_cache(cache, link.uri, tmp_path / "boot.trace")
        daemon = Daemon(cache, sockdir)
        try:
            wait_for(lambda: daemon.stats()["cached_clusters"] == len(order), 120, "prefetch")
        finally:
            daemon.stop()
        reads = [r for r in link.timeline() if r.length >= CLUSTER]
        sizes = [r.length for r in reads]
        assert sum(sizes) == len(order) * CLUSTER
        steps = [128 * KiB, 256 * KiB, 512 * KiB, MiB]
        ramp = sizes[:-2]  # of the last two (at full speed), one ends the run
        assert set(ramp) <= set(steps), sizes
        assert ramp == sorted(ramp), f"not a ramp: {sizes}"
        assert sizes[0] < MiB and MiB in sizes, sizes
        for r in reads[:-2]:
            if r.length < MiB:  # below full speed: nothing else on the wire
                assert not any(o is not r and (r.open_at(o.begin) or o.open_at(r.begin))
                               for o in reads), f"{r} overlapped another request"
        big = [r for r in reads if r.length == MiB]
        assert any(a.open_at(b.begin) for a in big for b in big), "never two at once"
        assert_qemu_check(cache)
    finally:
        link.stop()


def test_demand_reads_avoid_the_connections_of_prefetch_requests(
        storage: tuple[Path, bytes, str]) -> None:
    """A reader's misses go on base connections that carry no prefetch
    request (its reply would be queued ahead of theirs), while a prefetch at
    full speed (two requests of 1 MiB on the wire) runs beside them."""
    tmp, base, sockdir = storage
    link = SlowBase(tmp / "base.raw", sockdir, rate="256M", burstiness=0.05)
    try:
        profile_trace(tmp / "boot.trace", list(range(128)))  # the first 8 MiB
        cache = tmp / "cache.qcow2"
        create_profiled_cache(cache, link.uri, tmp / "boot.trace")
        wanted = [160 + 3 * k for k in range(8)]  # clusters no prefetch fetches

        async def main() -> list[bytes]:
            layer = await open_layer(str(cache))
            try:
                prefetch = Prefetcher(layer, quiet=0).start()  # full speed, no yielding
                # Until a prefetch request of 1 MiB is on the wire, then readers.
                while not any(r.length == MiB and r.end < 0
                              for r in link.timeline(finished=False)):
                    await asyncio.sleep(0.001)
                got = await asyncio.gather(*(layer.pread(ci * CLUSTER, CLUSTER)
                                             for ci in wanted))
                await prefetch.stop()
                return got
            finally:
                await layer.close()

        got = asyncio.run(main())
        for ci, data in zip(wanted, got, strict=True):
            assert data == base[ci * CLUSTER:(ci + 1) * CLUSTER], f"cluster {ci}"
        reads = [r for r in link.timeline() if r.length >= CLUSTER]  # not identity samples
        prefetches = [r for r in reads if r.offset < 8 * MiB]
        demand = [r for r in reads if r.offset // CLUSTER in wanted]
        assert {r.offset // CLUSTER for r in demand} == set(wanted)
        assert len({r.connection for r in reads}) == 4, "not a pool of 4 connections"
        beside = 0
        for d in demand:
            ahead = [p for p in prefetches if p.open_at(d.begin)]
            beside += bool(ahead)
            assert all(p.connection != d.connection for p in ahead), \
                f"demand read {d} sent behind prefetch {ahead}"
        assert beside, "no demand read ran beside the prefetch: the test proves nothing"
    finally:
        link.stop()


def test_prefetch_resumes_after_a_restart(storage: tuple[Path, bytes, str]) -> None:
    tmp, base, sockdir = storage
    link = SlowBase(tmp / "base.raw", sockdir, rate="16M")  # 8 MiB: about 4 s
    try:
        order = [ci for ci in range(200, 72, -1)]  # 128 clusters, backwards
        profile_trace(tmp / "boot.trace", order)
        cache = tmp / "cache.qcow2"
        create_profiled_cache(cache, link.uri, tmp / "boot.trace")
        first = Daemon(cache, sockdir)
        wait_for(lambda: first.stats()["prefetched_bytes"] >= 2 * MiB, 30, "some prefetch")
        first.stop()
        held = cached_clusters(cache)
        assert 0 < len(held) < len(order)
        assert held == set(order[:len(held)]), "not fetched in profile order"
        assert_qemu_check(cache)
        second = Daemon(cache, sockdir)
        try:
            wait_for(lambda: second.stats()["cached_clusters"] == len(order), 60, "prefetch")
            wait_for(lambda: second.stats()["fetches_in_flight"] == 0, 30, "stores")
            assert second.stats()["prefetched_bytes"] == (len(order) - len(held)) * CLUSTER
        finally:
            second.stop()
        assert cached_clusters(cache) == set(order)
        counts = link.cluster_reads()
        assert set(counts) == set(order) and set(counts.values()) == {1}, counts
        assert_qemu_check(cache)
        # What the VMs read is now local: a whole-profile read adds nothing on the link.
        before = len(link.reads())
        third = Daemon(cache, sockdir)
        try:
            for ci in order[:8]:
                got = qemu_io_read(third.uri, ci * CLUSTER, CLUSTER)
                assert got == base[ci * CLUSTER:(ci + 1) * CLUSTER]
            stats = third.stats()
            assert stats["prefetched_bytes"] == 0 and stats["misses"] == 0
        finally:
            third.stop()
        # Only the identity's 4 KiB samples (spec section 5), no data cluster.
        assert {n for _, n in link.reads()[before:]} == {4096}
    finally:
        link.stop()


def test_no_prefetch_turns_it_off(storage: tuple[Path, bytes, str]) -> None:
    tmp, base, sockdir = storage
    link = SlowBase(tmp / "base.raw", sockdir, rate="1G")
    try:
        profile_trace(tmp / "boot.trace", [5, 6, 7, 100])
        for how in ("flag", "config"):
            cache = tmp / f"cache-{how}.qcow2"
            create_profiled_cache(cache, link.uri, tmp / "boot.trace")
            if how == "flag":
                daemon = Daemon(cache, sockdir, "--no-prefetch")
            else:
                conf = tmp / "node.toml"
                sock = os.path.join(sockdir, "bc.sock")
                conf.write_text(f'[server]\nsocket = "{sock}"\nprefetch = false\n')
                daemon = Daemon(cache, sockdir, "--config", str(conf))
            try:
                # One read of cluster 50: the daemon serves, and fetches only that.
                run([QEMU_IO, "-f", "raw", "-r", "-c", f"read -P {base[50 * CLUSTER]} "
                     f"{50 * CLUSTER} 1", daemon.uri])
                wait_for(lambda d=daemon: d.stats()["fetches_in_flight"] == 0, 30, "store")
                stats = daemon.stats()
                assert stats["prefetched_bytes"] == 0 and stats["cached_clusters"] == 1
            finally:
                daemon.stop()
            assert cached_clusters(cache) == {50}
    finally:
        link.stop()


def test_cache_warm_fetches_the_profile_offline(storage: tuple[Path, bytes, str]) -> None:
    tmp, _, sockdir = storage
    link = SlowBase(tmp / "base.raw", sockdir, rate="1G")
    try:
        order = [30, 31, 32, 2, 200, 201, 9]
        profile_trace(tmp / "boot.trace", order)
        cache = tmp / "cache.qcow2"
        create_profiled_cache(cache, link.uri, tmp / "boot.trace", quota=str(6 * CLUSTER))
        proc = bootcache_cli("cache", "warm", cache)
        assert b"fetched 393216 of 393216 bytes" in proc.stderr, proc.stderr
        assert cached_clusters(cache) == set(order[:6])  # the quota's worth
        again = bootcache_cli("cache", "warm", cache)
        assert b"fetched 0 of 0 bytes" in again.stderr, again.stderr
        counts = link.cluster_reads()
        assert set(counts) == set(order[:6]) and set(counts.values()) == {1}
        assert_qemu_check(cache)
        run([QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", cache, tmp / "base.raw"])
    finally:
        link.stop()


def test_cache_warm_refuses_what_it_cannot_warm(tmp_path: Path) -> None:
    make_base(tmp_path / "base.raw", 1 * MiB, seed=1)
    cache = tmp_path / "cache.qcow2"
    bootcache_cli("create", "-q", "-f", "qcow2", "--cache-quota", "1M", "-b", "base.raw",
                  "-F", "raw", cache)
    proc = bootcache_cli("cache", "warm", cache, check=False)
    assert proc.returncode != 0 and b"has no boot profile" in proc.stderr, proc.stderr
    plain = tmp_path / "plain.qcow2"
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", plain, "1M"])
    proc = bootcache_cli("cache", "warm", plain, check=False)
    assert proc.returncode != 0 and b"not a cache image" in proc.stderr, proc.stderr


def test_reload_turns_prefetch_on_and_off_for_served_caches(
        storage: tuple[Path, bytes, str]) -> None:
    """SIGHUP / ctl reload applies a changed ``prefetch`` to the caches being
    served: on, the served cache starts on its profile; off, it stops; on
    again, it resumes and every cluster still crosses the link once."""
    tmp, base, sockdir = storage
    link = SlowBase(tmp / "base.raw", sockdir, rate="16M")  # 8 MiB: about 4 s
    try:
        order = list(range(40, 168))  # 128 clusters
        profile_trace(tmp / "boot.trace", order)
        cache = tmp / "cache.qcow2"
        create_profiled_cache(cache, link.uri, tmp / "boot.trace")
        conf = tmp / "node.toml"
        sock = os.path.join(sockdir, "bc.sock")

        def configure(prefetch: bool) -> None:
            # The export is in the file: a reload serves the file's catalog.
            conf.write_text(f'[server]\nsocket = "{sock}"\n'
                            f"prefetch = {'true' if prefetch else 'false'}\n"
                            f'[[export]]\nimage = "{cache}"\nname = "c"\n')

        def reload() -> dict[str, Any]:
            out = bootcache_cli("ctl", "--control", daemon.ctl, "reload").stdout
            doc: dict[str, Any] = json.loads(out)
            assert doc["errors"] == [] and doc["needs_restart"] == [], doc
            return doc

        configure(False)
        daemon = Daemon(cache, sockdir, "--config", str(conf), images=False)
        try:
            got = qemu_io_read(daemon.uri, 3 * CLUSTER, CLUSTER)  # served, not prefetching
            assert got == base[3 * CLUSTER:4 * CLUSTER]
            assert daemon.stats()["prefetched_bytes"] == 0
            configure(True)
            assert reload()["applied"] == {"prefetch": {"started": 1}}
            wait_for(lambda: daemon.stats()["prefetched_bytes"] >= 2 * MiB, 30, "prefetch")
            configure(False)
            assert reload()["applied"] == {"prefetch": {"stopped": 1}}
            wait_for(lambda: daemon.stats()["fetches_in_flight"] == 0, 30, "stores")
            stopped_at = daemon.stats()["cached_clusters"]
            assert stopped_at < len(order) + 1, "the prefetch ended before it was stopped"
            assert reload()["applied"] == {}  # unchanged: nothing to apply
            configure(True)
            daemon.proc.send_signal(signal.SIGHUP)  # the same, by signal
            wait_for(lambda: daemon.stats()["cached_clusters"] == len(order) + 1, 60,
                     "prefetch resumed")
            wait_for(lambda: daemon.stats()["fetches_in_flight"] == 0, 30, "stores")
        finally:
            daemon.stop()
        assert cached_clusters(cache) == set(order) | {3}
        counts = link.cluster_reads()
        assert set(counts) == set(order) | {3} and set(counts.values()) == {1}, counts
        assert_qemu_check(cache)
        run([QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", cache, tmp / "base.raw"])
    finally:
        link.stop()


def test_no_prefetch_flag_outlasts_a_reload(storage: tuple[Path, bytes, str]) -> None:
    """``serve --no-prefetch`` pins the setting: reloading a file that says
    ``prefetch = true`` leaves it off."""
    tmp, base, sockdir = storage
    link = SlowBase(tmp / "base.raw", sockdir, rate="1G")
    try:
        profile_trace(tmp / "boot.trace", [5, 6, 7, 100])
        cache = tmp / "cache.qcow2"
        create_profiled_cache(cache, link.uri, tmp / "boot.trace")
        conf = tmp / "node.toml"
        sock = os.path.join(sockdir, "bc.sock")
        conf.write_text(f'[server]\nsocket = "{sock}"\nprefetch = true\n'
                        f'[[export]]\nimage = "{cache}"\nname = "c"\n')
        daemon = Daemon(cache, sockdir, "--config", str(conf), "--no-prefetch", images=False)
        try:
            doc = json.loads(bootcache_cli("ctl", "--control", daemon.ctl, "reload").stdout)
            assert doc["applied"] == {} and doc["needs_restart"] == [], doc
            got = qemu_io_read(daemon.uri, 50 * CLUSTER, CLUSTER)
            assert got == base[50 * CLUSTER:51 * CLUSTER]
            wait_for(lambda: daemon.stats()["fetches_in_flight"] == 0, 30, "store")
            stats = daemon.stats()
            assert stats["prefetched_bytes"] == 0 and stats["cached_clusters"] == 1
        finally:
            daemon.stop()
    finally:
        link.stop()
