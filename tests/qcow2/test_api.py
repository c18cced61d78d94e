"""The Python API's edges: bad input raises BootcacheError subclasses, sizes as qemu-img,
requests outside the disk, use after close, locks released on errors."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import bootcache
from bootcache.errors import BootcacheError

from .conftest import MiB, bootcache_cli, qemu_img_create, qemu_img_info, run_qemu_io


@pytest.mark.parametrize("options", [
    {"cluster_size": 1000}, {"cluster_size": 256}, {"cluster_size": 4 * MiB},
    {"refcount_bits": 3}, {"refcount_bits": 128}, {"compat": "0.10", "refcount_bits": 8},
    {"compat": "2.0"}, {"compression_type": "lz4"}, {"compat": "0.10", "lazy_refcounts": True},
    {"compat": "0.10", "compression_type": "zstd"}, {"backing_fmt": "raw"},
], ids=str)
def test_create_rejects_bad_options(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(BootcacheError):
        bootcache.create(str(tmp_path / "x.qcow2"), MiB, **options)


@pytest.mark.parametrize("size", [-1, 1 << 63])
def test_create_rejects_bad_sizes(tmp_path: Path, size: int) -> None:
    with pytest.raises(BootcacheError):
        bootcache.create(str(tmp_path / "x.qcow2"), size)


def test_create_in_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BootcacheError):
        bootcache.create(str(tmp_path / "no" / "such" / "x.qcow2"), MiB)


def test_create_on_unusable_path(tmp_path: Path) -> None:
    with pytest.raises(BootcacheError):
        bootcache.create(str(tmp_path), MiB)  # a folder


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_unaligned_size_rounded_up_like_qemu_img(tmp_path: Path, fmt: str) -> None:
    """qemu-img rounds a size up to a multiple of 512; QEMU reads a qcow2 header size
    rounded down, so an unaligned size in the header makes QEMU and bootcache disagree."""
    theirs = tmp_path / f"q.{fmt}"
    qemu_img_create(theirs, 1000, fmt=fmt)
    expected = qemu_img_info(theirs)["virtual-size"]
    assert expected == 1024
    ours = tmp_path / f"b.{fmt}"
    bootcache.create(str(ours), 1000, fmt=fmt)
    assert qemu_img_info(ours)["virtual-size"] == expected
    with bootcache.open(str(ours)) as disk:
        assert disk.size == expected
    cli = tmp_path / f"c.{fmt}"
    assert bootcache_cli("create", "-f", fmt, cli, "1000").returncode == 0
    assert qemu_img_info(cli)["virtual-size"] == expected


@pytest.mark.parametrize("header_size", [1000, 2 * MiB + 1, 2 * MiB - 1])
def test_unaligned_header_size_read_like_qemu(tmp_path: Path, header_size: int) -> None:
    """A qcow2 header whose size is not a multiple of 512: QEMU rounds it down."""
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, 2 * MiB)
    with open(img, "r+b") as f:
        f.seek(24)
        f.write(header_size.to_bytes(8, "big"))
    expected = qemu_img_info(img)["virtual-size"]
    assert expected == header_size // 512 * 512
    with bootcache.open(str(img)) as disk:
        assert disk.size == expected


def test_open_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(BootcacheError):
        bootcache.open(str(tmp_path / "missing.qcow2"))
    with pytest.raises(BootcacheError):
        bootcache.open(str(tmp_path))  # a folder


def test_tiny_files_are_raw(tmp_path: Path) -> None:
    for content in (b"", b"QFI", b"hello world"):
        f = tmp_path / "tiny.img"
        f.write_bytes(content)
        with bootcache.open(str(f)) as disk:
            assert disk.size == len(content)
            assert disk.read(0, len(content)) == content


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, MiB)
    run_qemu_io(img, ["write -q -P 0x44 0 64k"])
    return img


def test_requests_outside_the_disk(image: Path) -> None:
    """Out-of-range requests raise (ValueError or BootcacheError) and change nothing."""
    with bootcache.open(str(image), writable=True) as disk:
        calls: list[Callable[[], object]] = [
            lambda: disk.read(MiB - 10, 20), lambda: disk.read(MiB, 1),
            lambda: disk.read(-1, 5), lambda: disk.read(0, -1),
            lambda: disk.write(MiB - 1, b"ab"), lambda: disk.write(-5, b"a"),
            lambda: disk.write_zeroes(MiB - 1, 2), lambda: disk.discard(MiB - 512, 1024),
            lambda: disk.read(0, 1 << 62)]
        for call in calls:
            with pytest.raises((ValueError, BootcacheError)):
                call()
        assert disk.read(0, 64 * 1024) == b"\x44" * 65536
        assert disk.read(MiB - 1, 1) == b"\x00"
        assert disk.read(5, 0) == b""
        disk.write(MiB - 2, b"ok")
        assert disk.read(MiB - 2, 2) == b"ok"


def test_use_after_close_is_a_clear_error(image: Path) -> None:
    disk = bootcache.open(str(image), writable=True)
    disk.close()
    disk.close()  # closing twice is harmless
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls: list[Callable[[], object]] = [lambda: disk.read(0, 1),
                                             lambda: disk.write(0, b"x"), disk.flush]
        for call in calls:
            with pytest.raises((ValueError, BootcacheError)) as excinfo:
                call()
            assert "close" in str(excinfo.value).lower(), str(excinfo.value)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)], \
        [str(w.message) for w in caught]


def test_lock_released_when_with_block_raises(image: Path) -> None:
    with pytest.raises(KeyError), bootcache.open(str(image), writable=True) as disk:
        disk.write(0, b"boom")
        raise KeyError("leave the block")
    run_qemu_io(image, ["write -q -P 0x45 512 512"])  # qemu-io can take the lock again
    with bootcache.open(str(image)) as disk:
        assert disk.read(0, 4) == b"boom"


def test_cli_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    cases: list[list[str | Path]] = [
        ["info", tmp_path / "missing.qcow2"], ["info", tmp_path],
        ["check", tmp_path / "missing.qcow2"], ["map", tmp_path / "missing.qcow2"],
        ["create", "-o", "cluster_size=1000", tmp_path / "x.qcow2", "1M"],
        ["create", "-o", "bogus_key=1", tmp_path / "x.qcow2", "1M"],
        ["create", tmp_path / "x.qcow2", "12Q"], ["create", tmp_path / "no" / "x.qcow2", "1M"]]
    for args in cases:
        proc = bootcache_cli(*args)
        assert proc.returncode != 0, args
        assert b"Traceback" not in proc.stderr, (args, proc.stderr.decode())
        assert proc.stderr.strip(), args
