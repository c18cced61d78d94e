"""Images QEMU opens that bootcache used to refuse (issue 9 item 3).

Each class comes from ``tools/fuzz_qcow2.py --differential``: an image made by
qemu-img, patched the way the fuzzer did, that ``qemu-img check`` finds clean
and qemu-io reads. bootcache must open it and read the bytes QEMU reads. The
neighbouring classes that stay refused (see "Images refused although QEMU opens
them" in docs/design.md) are checked to still get a clear error.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import bootcache
from bootcache.errors import ImageFormatError

from .conftest import (
    MiB,
    assert_qemu_check_clean,
    assert_same_bytes,
    bootcache_read_all,
    qemu_img_create,
    qemu_raw_bytes,
    run_qemu_io,
)

EXT_BACKING_FORMAT = 0xE2792ACA


def _backing_chain(tmp_path: Path, **options: object) -> tuple[Path, Path]:
    """base.raw (pattern 0x5a) under top.qcow2, which holds 0x11 in its first 64 KiB."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * MiB)
    top = tmp_path / "top.qcow2"
    qemu_img_create(top, MiB, backing="base.raw", backing_fmt="raw", **options)
    run_qemu_io(top, ["write -q -P 0x11 0 64k"])
    return base, top


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _backing_field(path: Path) -> tuple[int, int]:
    offset, size = struct.unpack_from(">QI", path.read_bytes(), 8)
    return offset, size


def _same_as_qemu(path: Path, expect: dict[int, int]) -> None:
    """qemu-img check is clean, qemu-io reads ``expect`` ({64 KiB chunk: byte}),
    and bootcache reads exactly what qemu-img convert reads."""
    assert_qemu_check_clean(path)
    run_qemu_io(path, [f"read -q -P {value:#x} {chunk * 65536} 64k"
                       for chunk, value in expect.items()])
    assert_same_bytes(bootcache_read_all(path), qemu_raw_bytes(path), f"{path.name} vs QEMU")


def _writes_stay_clean(path: Path) -> None:
    with bootcache.open(str(path), writable=True) as img:
        img.write(65536 + 100, b"\x77" * 5000)
    assert_qemu_check_clean(path)
    run_qemu_io(path, ["read -q -P 0x77 65636 5000"])


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_backing_name_of_length_zero_means_no_backing_file(tmp_path: Path, compat: str) -> None:
    """backing_file_offset set, backing_file_size 0: an empty name; QEMU opens no
    backing file, so unallocated clusters read as zeros."""
    _, top = _backing_chain(tmp_path, compat=compat)
    _patch(top, 16, struct.pack(">I", 0))
    _same_as_qemu(top, {0: 0x11, 1: 0x00, 15: 0x00})
    _writes_stay_clean(top)


def test_backing_offset_without_name_in_an_image_without_backing(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, MiB)
    run_qemu_io(img, ["write -q -P 0x22 64k 64k"])
    _patch(img, 8, struct.pack(">Q", 0x200))  # backing_file_size stays 0
    _same_as_qemu(img, {0: 0x00, 1: 0x22})


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_backing_name_padded_with_nuls(tmp_path: Path, compat: str) -> None:
    """A name length that covers NUL padding: QEMU (reading a C string) opens the
    name before the NULs, and so does bootcache."""
    _, top = _backing_chain(tmp_path, compat=compat)
    offset, size = _backing_field(top)
    assert top.read_bytes()[offset + size:offset + size + 8] == bytes(8)
    _patch(top, 16, struct.pack(">I", size + 8))
    _same_as_qemu(top, {0: 0x11, 1: 0x5A, 15: 0x5A})
    _writes_stay_clean(top)


def test_backing_name_of_nuls_only_means_no_backing_file(tmp_path: Path) -> None:
    _, top = _backing_chain(tmp_path)
    offset, size = _backing_field(top)
    _patch(top, offset, bytes(size))
    _same_as_qemu(top, {0: 0x11, 1: 0x00})


def test_backing_format_padded_with_nuls(tmp_path: Path) -> None:
    """The backing format extension's length covers its NUL padding ("raw\\0\\0\\0\\0\\0")."""
    _, top = _backing_chain(tmp_path)
    data = top.read_bytes()
    pos = 112  # extensions follow qemu-img's 112-byte v3 header
    while struct.unpack_from(">I", data, pos)[0] != EXT_BACKING_FORMAT:
        pos += 8 + (struct.unpack_from(">I", data, pos + 4)[0] + 7) // 8 * 8
    assert data[pos + 8:pos + 16] == b"raw" + bytes(5)
    _patch(top, pos + 4, struct.pack(">I", 8))
    _same_as_qemu(top, {0: 0x11, 1: 0x5A})


def test_nul_inside_a_backing_name_stays_refused(tmp_path: Path) -> None:
    """QEMU would open "base" for "base\\0raw"; which file was meant is unknowable."""
    _, top = _backing_chain(tmp_path)
    offset, _ = _backing_field(top)
    _patch(top, offset + 4, b"\0")
    with pytest.raises(ImageFormatError, match="NUL byte followed by more bytes"):
        bootcache.open(str(top)).close()


def test_nul_inside_a_backing_format_stays_refused(tmp_path: Path) -> None:
    _, top = _backing_chain(tmp_path)
    data = top.read_bytes()
    pos = data.index(struct.pack(">II", EXT_BACKING_FORMAT, 3))
    _patch(top, pos + 4, struct.pack(">I", 8))
    _patch(top, pos + 8 + 6, b"x")  # "raw\0\0\0x\0"
    with pytest.raises(ImageFormatError, match="format name contains a NUL"):
        bootcache.open(str(top)).close()
