"""The quick boot storm (the README's main job) and its invariants.

Real peers: nbdkit (rate and log filters) is the storage node and link;
``bootcache serve`` runs as its own process; VMs replay the shipped Debian 12
boot trace over NBD and every read is checked against the base's bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bootcache.storm import bench, nodes, trace

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="nbdkit is not installed")


def test_quick_storm_invariants(tmp_path: Path) -> None:
    tr = trace.debian12()
    settings = bench.Settings(trace=tr, ns=(1, 4), gap_scales=(0.0,),
                              configs=bench.QUICK_CONFIGS, verify="all",
                              workdir=str(tmp_path), progress=lambda _: None)
    rows = bench.run(settings)
    by = {(r.config, r.n): r for r in rows}
    assert set(by) == {(c, n) for c in bench.QUICK_CONFIGS for n in (1, 4)}
    # Every read of every VM was checked against the base (a wrong byte raises).
    for r in rows:
        assert r.reads_verified == r.n * len(tr.requests), r
    distinct = tr.distinct_bytes(nodes.BLOCK)
    # Without a cache every VM pulls its reads over the link...
    assert by["no-cache", 4].link_bytes == 4 * tr.total_bytes
    # ...with a cold cache, N VMs cost one working set (plus the identity samples).
    for n in (1, 4):
        assert distinct <= by["bootcache-cold", n].link_bytes <= 1.05 * distinct
    # A warm cache, in the same daemon or after a restart, never touches the base.
    for n in (1, 4):
        assert by["bootcache-warm", n].link_bytes == 0
        assert by["bootcache-restart", n].link_bytes == 0
    table = bench.markdown(rows, tr)
    assert "| bootcache-warm |" in table
    goals = bench.check_goals(rows, tr)
    assert not [g for g in goals if g.startswith("FAIL")], goals
