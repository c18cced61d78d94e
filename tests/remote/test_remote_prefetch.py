"""Issue 12, item 2: a daemon prefetches exactly the boot profile of a cache
whose base is behind nginx (HTTP), and reports it in `ctl stats` and in its
Prometheus metrics. nginx's access log says what crossed the wire.
"""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cache.conftest import QEMU_IMG, short_tmpdir, wait_for
from cache.test_cache_prefetch import CLUSTER, Daemon, profile_trace, qemu_io_read

from .conftest import BOOTCACHE, MiB, NginxServer, free_port, run

SIZE = 8 * MiB


def without_backing(image: Path) -> str:
    """The image for qemu-img with its backing file cut off (this QEMU has no curl)."""
    return "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                 "file": {"driver": "file", "filename": str(image)}})


def test_prefetch_warms_exactly_the_profile_over_http(nginx: NginxServer,
                                                      tmp_path: Path) -> None:
    disk = random.Random(12).randbytes(SIZE)
    nginx.put("disk.raw", disk)
    url = nginx.url("disk.raw")
    order = [40, 41, 42, 43, 3, 100, 101, 102, 7, 127, 0]
    profile_trace(tmp_path / "boot.trace", order)
    cache = tmp_path / "cache.qcow2"
    run([*BOOTCACHE, "create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b", url,
         "-F", "raw", "--cache-profile", str(tmp_path / "boot.trace"), str(cache)])
    before = len(nginx.access_log())
    port = free_port()
    sockdir = short_tmpdir()
    daemon = Daemon(cache, sockdir, "--metrics", f"127.0.0.1:{port}")
    try:
        want = len(order) * CLUSTER
        wait_for(lambda: daemon.stats()["prefetched_bytes"] == want, 60, "prefetch")
        wait_for(lambda: daemon.stats()["fetches_in_flight"] == 0, 30, "stores")
        # The VMs' reads of profile clusters are hits on prefetched clusters.
        for ci in (41, 100, 0):
            assert qemu_io_read(daemon.uri, ci * CLUSTER + 100, 4000) == \
                disk[ci * CLUSTER + 100:ci * CLUSTER + 4100]
        stats = daemon.stats()
        assert stats["bytes_from_base"] == want and stats["misses"] == 0
        assert stats["prefetch_hits"] == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        values = {(s.name, s.labels.get("cache", "")): s.value
                  for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert [v for (name, _), v in values.items()
                if name == "bootcache_cache_prefetched_bytes_total"] == [want]
        assert [v for (name, _), v in values.items()
                if name == "bootcache_cache_prefetch_hits_total"] == [3]
    finally:
        daemon.stop()
    runs = json.loads(run([QEMU_IMG, "map", "--output", "json",
                           without_backing(cache)]).stdout)
    held = {ci for e in runs if e["data"]
            for ci in range(e["start"] // CLUSTER, (e["start"] + e["length"]) // CLUSTER)}
    assert held == set(order)
    # On the wire: the profile's clusters once, and the identity's 4 KiB samples.
    sent = [int(line[-1]) for line in nginx.access_log()[before:] if line[2] == "206"]
    assert sum(sent) == len(order) * CLUSTER + 8 * 4096, sent
    run([QEMU_IMG, "check", without_backing(cache)])
