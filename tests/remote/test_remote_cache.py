"""Issue 5, acceptance 1: a cache over each remote source returns the base's
bytes, for raw, qcow2 and compressed qcow2 bases, and a warm second pass
touches the source not at all, as the server's own log or metrics show.

The oracle for the guest bytes is the raw disk the bases were made from,
and ``qemu-img convert -O raw`` of each qcow2 base agrees with it.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from bootcache.layers.cache import CacheLayer
from bootcache.layers.chain import open_layer

from .conftest import BOOTCACHE, QEMU_IMG, MiB, Remote, run

SIZE = 4 * MiB
KINDS = ["nginx", "s3", "qemu-nbd", "nbdkit"]
FORMATS = ["raw", "qcow2", "qcow2-compressed"]


def guest_disk(seed: int) -> bytes:
    """Random islands, compressible runs and holes (unallocated in a qcow2 base)."""
    rng = random.Random(seed)
    disk = bytearray(SIZE)
    for _ in range(20):
        off = rng.randrange(0, SIZE - 300_000)
        n = rng.randrange(1, 300_000)
        if rng.random() < 0.5:
            disk[off:off + n] = rng.randbytes(n)
        else:
            disk[off:off + n] = (rng.randbytes(64) * (n // 64 + 1))[:n]
    disk[SIZE - 5:] = b"tail!"  # the last byte matters too
    return bytes(disk)


def base_image(tmp_path: Path, guest: bytes, fmt: str) -> bytes:
    """The base file's bytes in ``fmt``, checked against the guest disk by qemu-img."""
    raw = tmp_path / "guest.raw"
    raw.write_bytes(guest)
    if fmt == "raw":
        return guest
    out = tmp_path / "base.qcow2"
    extra = ["-c"] if fmt == "qcow2-compressed" else []
    run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", *extra, str(raw), str(out)])
    back = tmp_path / "back.raw"
    run([QEMU_IMG, "convert", "-q", "-f", "qcow2", "-O", "raw", str(out), str(back)])
    assert back.read_bytes() == guest, "qemu-img convert -O raw of the base"
    return out.read_bytes()


def create_cache(cache: Path, uri: str, fmt: str) -> None:
    run([*BOOTCACHE, "create", "-q", "-f", "qcow2", "--cache-quota", "100M", "-b", uri,
         "-F", "raw" if fmt == "raw" else "qcow2", str(cache), str(SIZE)])


def cache_stats(cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        run([*BOOTCACHE, "cache", "stats", "--output", "json", str(cache)]).stdout)
    return out


def source_of(layer: CacheLayer) -> Any:
    """The remote byte source under the cache (below a raw or a qcow2 base layer)."""
    return layer.base.source  # type: ignore[attr-defined]


def diff_at(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    i = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"first difference at byte {i}"


async def pass_uneven(layer: CacheLayer, guest: bytes, rng: random.Random) -> None:
    """Every byte once, in unaligned pieces of 1 B to 300 KB, checked."""
    off = 0
    while off < SIZE:
        n = min(rng.choice([1, 511, 4096, 65536, rng.randrange(1, 300_000)]), SIZE - off)
        got = await layer.pread(off, n)
        assert got == guest[off:off + n], f"read {off}+{n}: {diff_at(got, guest[off:off + n])}"
        off += n


async def pass_mixed(layer: CacheLayer, guest: bytes, rng: random.Random) -> None:
    """Random reads, concurrent ones included, then the whole disk at once."""
    reqs = [(o, rng.randrange(1, min(SIZE - o, 500_000) + 1))
            for o in (rng.randrange(SIZE) for _ in range(60))]
    results = await asyncio.gather(*(layer.pread(o, n) for o, n in reqs))
    for (o, n), got in zip(reqs, results, strict=True):
        assert got == guest[o:o + n], f"read {o}+{n}: {diff_at(got, guest[o:o + n])}"
    whole = await layer.pread(0, SIZE)
    assert whole == guest, f"whole disk: {diff_at(whole, guest)}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("remote", KINDS, indirect=True)
def test_cache_over_remote_base(remote: Remote, fmt: str, tmp_path: Path) -> None:
    guest = guest_disk(seed=len(fmt) * 31 + KINDS.index(remote.kind))
    uri = remote.publish(f"base-{fmt}.img", base_image(tmp_path, guest, fmt))
    cache = tmp_path / "cache.qcow2"
    create_cache(cache, uri, fmt)
    rng = random.Random(f"{remote.kind}-{fmt}")

    async def cold_then_warm() -> dict[str, Any]:
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer), type(layer)
        try:
            src = source_of(layer)
            opened = remote.settled_touches()
            await pass_uneven(layer, guest, rng)
            await layer.settle()
            cold = remote.settled_touches()
            requests = src.stats()["requests"]
            assert cold > opened, "the cold pass never reached the server"
            assert layer.stats()["bytes_from_base"] == SIZE

            await pass_mixed(layer, guest, rng)
            await pass_uneven(layer, guest, rng)
            await layer.settle()
            assert remote.settled_touches() == cold, \
                f"{remote.kind}: the warm pass reached the server"
            assert src.stats()["requests"] == requests
            stats: dict[str, Any] = layer.stats()
            # The control: one read past the cache shows up in the server's count
            # at once (so the count above was not merely late).
            await src.pread(0, 4096)
            assert remote.settled_touches() > cold, f"{remote.kind}: the count is not live"
            return stats
        finally:
            await layer.close()

    stats = asyncio.run(cold_then_warm())
    assert stats["bytes_from_base"] == SIZE
    assert stats["cached_clusters"] == SIZE // stats["cluster_size"]

    async def reopened() -> None:
        # Opening again checks the base's identity (that does reach the
        # server); reading everything afterwards does not.
        layer = await open_layer(str(cache))
        assert isinstance(layer, CacheLayer)
        try:
            opened = remote.settled_touches()
            await pass_mixed(layer, guest, rng)
            await layer.settle()
            assert remote.settled_touches() == opened, \
                f"{remote.kind}: a warm pass after reopening reached the server"
        finally:
            await layer.close()

    asyncio.run(reopened())
    on_disk = cache_stats(cache)
    assert on_disk["bytes_from_base"] == SIZE
    assert on_disk["resets"] == 0
    # QEMU agrees on what the cache image holds: every cluster, allocated here
    # (its backing left out: QEMU cannot open s3:// and need not reach the others).
    spec = {"driver": "qcow2", "backing": None,
            "file": {"driver": "file", "filename": str(cache)}}
    mapped = json.loads(run([QEMU_IMG, "map", "-U", "--output", "json",
                             "json:" + json.dumps(spec)]).stdout)
    held = sum(e["length"] for e in mapped if e["depth"] == 0 and e["data"])
    assert held == SIZE
