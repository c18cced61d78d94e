"""Acceptance 1: images bootcache creates are accepted by qemu-img.

Every cluster size from 512 B to 2 MiB, compat 0.10 and 1.1, with and without
a backing file, every refcount width: ``qemu-img check`` is clean, and
``qemu-img info`` agrees with ``bootcache info`` on what the image is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import bootcache

from .conftest import (
    ALL_CLUSTER_SIZES,
    ALL_REFCOUNT_BITS,
    GiB,
    KiB,
    MiB,
    assert_qemu_check_clean,
    assert_same_bytes,
    bootcache_cli,
    qemu_img_create,
    qemu_img_info,
    qemu_raw_bytes,
    run_qemu_io,
)


@dataclass(frozen=True)
class CreateCase:
    cluster_size: int
    compat: str
    refcount_bits: int
    backing_fmt: str | None  # None: no backing file

    def __str__(self) -> str:
        backing = f"backing-{self.backing_fmt}" if self.backing_fmt else "nobacking"
        return f"cs{self.cluster_size}-v{self.compat}-rc{self.refcount_bits}-{backing}"


def _cases() -> list[CreateCase]:
    """Every cluster size x compat x backing, with refcount widths spread over them,
    plus every refcount width with the smallest and the largest clusters."""
    cases = []
    i = 0
    for cs in ALL_CLUSTER_SIZES:
        for compat in ("0.10", "1.1"):
            for backing in (None, ("qcow2", "raw")[i // 2 % 2]):
                bits = 16 if compat == "0.10" else ALL_REFCOUNT_BITS[i % len(ALL_REFCOUNT_BITS)]
                i += 1
                cases.append(CreateCase(cs, compat, bits, backing))
    for bits in ALL_REFCOUNT_BITS:
        for cs in (512, 2 * MiB):
            cases.append(CreateCase(cs, "1.1", bits, None))
    return sorted(set(cases), key=str)


CASES = _cases()


def _virtual_size(case: CreateCase) -> int:
    # Some sizes not a multiple of the cluster size, some larger than one L2 table maps.
    return 7 * MiB + (case.cluster_size // 512 % 7) * 512


def _make_backing(tmp_path: Path, fmt: str, size: int) -> Path:
    backing = tmp_path / f"base.{fmt}"
    qemu_img_create(backing, size, fmt=fmt)
    run_qemu_io(backing, ["write -P 0x5b 0 64k", f"write -P 0x3c {size - 4096} 4096"], fmt=fmt)
    return backing


def _create(tmp_path: Path, case: CreateCase) -> tuple[Path, Path | None]:
    size = _virtual_size(case)
    backing = _make_backing(tmp_path, case.backing_fmt, size) if case.backing_fmt else None
    img = tmp_path / "img.qcow2"
    bootcache.create(
        str(img), size, cluster_size=case.cluster_size, compat=case.compat,
        refcount_bits=case.refcount_bits,
        backing_file=backing.name if backing else None,
        backing_fmt=case.backing_fmt)
    return img, backing


def _bootcache_info(path: Path, *extra: str) -> Any:
    proc = bootcache_cli("info", "--output", "json", *extra, path)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def _assert_info_agrees(path: Path, case: CreateCase, backing: Path | None) -> None:
    ours = _bootcache_info(path)
    theirs = qemu_img_info(path)
    for key in ("virtual-size", "cluster-size", "format", "backing-filename",
                "backing-filename-format"):
        assert ours.get(key) == theirs.get(key), (key, ours, theirs)
    assert theirs["virtual-size"] == _virtual_size(case)
    assert theirs["cluster-size"] == case.cluster_size
    assert theirs["format"] == "qcow2"
    qdata = theirs["format-specific"]["data"]
    assert qdata["compat"] == case.compat
    odata = ours["format-specific"]["data"]
    assert odata["compat"] == qdata["compat"]
    if case.compat == "1.1":
        assert qdata["refcount-bits"] == case.refcount_bits
        assert odata["refcount-bits"] == qdata["refcount-bits"]
        assert odata["lazy-refcounts"] == qdata["lazy-refcounts"] is False
    if backing is not None:
        assert theirs["backing-filename"] == backing.name
        assert theirs["backing-filename-format"] == case.backing_fmt


@pytest.mark.parametrize("case", CASES, ids=str)
def test_created_image_passes_qemu_check_and_info_agrees(tmp_path: Path, case: CreateCase) -> None:
    img, backing = _create(tmp_path, case)
    assert_qemu_check_clean(img)
    _assert_info_agrees(img, case, backing)
    expected = bytearray(_virtual_size(case))
    if backing is not None:
        expected[:] = qemu_raw_bytes(backing)
    assert_same_bytes(qemu_raw_bytes(img), bytes(expected), "fresh image contents")


# A thinner sweep of the same matrix with data written through bootcache: the first
# allocations (L2 tables, refcount blocks, data clusters) must keep qemu-img happy too.
WRITE_CASES = CASES[::3]


@pytest.mark.parametrize("case", WRITE_CASES, ids=str)
def test_created_image_with_writes_passes_qemu_check(tmp_path: Path, case: CreateCase) -> None:
    img, backing = _create(tmp_path, case)
    size = _virtual_size(case)
    expected = bytearray(size) if backing is None else bytearray(qemu_raw_bytes(backing))
    writes = [(0, b"\xa1" * 100), (case.cluster_size - 7, b"\xb2" * 300),
              (size // 2 + 3, bytes(range(256)) * 40), (size - 1000, b"\xc3" * 1000)]
    with bootcache.open(str(img), writable=True) as disk:
        for off, data in writes:
            disk.write(off, data)
            expected[off:off + len(data)] = data
        disk.flush()
    assert_qemu_check_clean(img)
    assert_same_bytes(qemu_raw_bytes(img), bytes(expected), "after writes")
    _assert_info_agrees(img, case, backing)


def test_create_options_lazy_refcounts_and_zstd(tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    bootcache.create(str(img), 3 * MiB, lazy_refcounts=True, compression_type="zstd")
    assert_qemu_check_clean(img)
    data = qemu_img_info(img)["format-specific"]["data"]
    assert data["lazy-refcounts"] is True
    assert data["compression-type"] == "zstd"
    ours = _bootcache_info(img)["format-specific"]["data"]
    assert ours["lazy-refcounts"] is True
    with bootcache.open(str(img), writable=True) as disk:
        disk.write(12345, b"lazy" * 1000)
    assert_qemu_check_clean(img)
    assert qemu_raw_bytes(img)[12345:16345] == b"lazy" * 1000


@pytest.mark.parametrize("argv, expect", [
    (["-f", "qcow2", "-o", "cluster_size=4096,compat=1.1,refcount_bits=4", "{img}", "5M"],
     {"virtual-size": 5 * MiB, "cluster-size": 4096, "refcount-bits": 4, "compat": "1.1"}),
    (["-o", "cluster_size=2M,compat=0.10", "{img}", "1G"],
     {"virtual-size": GiB, "cluster-size": 2 * MiB, "compat": "0.10"}),
    (["-f", "qcow2", "-o", "cluster_size=512,lazy_refcounts=on,refcount_bits=64", "{img}", "768K"],
     {"virtual-size": 768 * KiB, "cluster-size": 512, "refcount-bits": 64,
      "lazy-refcounts": True}),
    (["-o", "compression_type=zstd", "{img}", "2T"],
     {"virtual-size": 2 << 40, "cluster-size": 64 * KiB, "compression-type": "zstd"}),
], ids=["4k-rc4", "2M-v2", "512-lazy-rc64", "zstd-2T"])
def test_cli_create(tmp_path: Path, argv: list[str], expect: dict[str, Any]) -> None:
    img = tmp_path / "cli.qcow2"
    proc = bootcache_cli("create", *[a.format(img=img) for a in argv])
    assert proc.returncode == 0, proc.stderr.decode()
    assert_qemu_check_clean(img)
    info = qemu_img_info(img)
    merged = {**info, **info["format-specific"]["data"]}
    for key, value in expect.items():
        assert merged[key] == value, (key, merged)


def test_cli_create_with_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img_create(base, "3M", fmt="raw")
    run_qemu_io(base, ["write -P 0x77 4096 8192"], fmt="raw")
    top = tmp_path / "top.qcow2"
    proc = bootcache_cli("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    assert proc.returncode == 0, proc.stderr.decode()
    info = qemu_img_info(top)
    assert info["virtual-size"] == 3 * MiB  # size taken from the backing file
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"
    assert_qemu_check_clean(top)
    assert_same_bytes(qemu_raw_bytes(top), qemu_raw_bytes(base, fmt="raw"), "overlay")

    chain = bootcache_cli("info", "--output", "json", "--backing-chain", top)
    assert chain.returncode == 0, chain.stderr.decode()
    ours = json.loads(chain.stdout)
    theirs = qemu_img_info(top, backing_chain=True)
    assert [i["format"] for i in ours] == [i["format"] for i in theirs] == ["qcow2", "raw"]
    assert [i["virtual-size"] for i in ours] == [i["virtual-size"] for i in theirs]


def test_cli_create_raw(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    proc = bootcache_cli("create", "-f", "raw", img, "1M")
    assert proc.returncode == 0, proc.stderr.decode()
    assert img.stat().st_size == MiB
    assert qemu_img_info(img)["format"] == "raw"


def test_huge_image_opens_fast(tmp_path: Path) -> None:
    """A 2 TiB image: creation and open take milliseconds, not a walk over the L1."""
    for maker in ("bootcache", "qemu"):
        img = tmp_path / f"{maker}.qcow2"
        if maker == "bootcache":
            bootcache.create(str(img), 2 << 40)
        else:
            qemu_img_create(img, "2T")
            run_qemu_io(img, ["write -P 0x42 2047G 1M"])
        assert_qemu_check_clean(img)
        start = time.perf_counter()
        with bootcache.open(str(img), writable=True) as disk:
            assert disk.size == 2 << 40
            if maker == "bootcache":
                disk.write(2047 * GiB, b"\x42" * MiB)
            assert disk.read(2047 * GiB, MiB) == b"\x42" * MiB
            assert disk.read(5 * GiB, 4096) == bytes(4096)
        assert time.perf_counter() - start < 2.0
        assert_qemu_check_clean(img)
