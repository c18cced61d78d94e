"""Feature bits, header extensions and special cluster states, against qemu-made images.

The issue's rules: unknown incompatible bits refuse to open; unknown autoclear
bits are cleared when opened for writing; a dirty (lazy refcounts) image is
repaired or refused, never used as if clean; the corrupt bit refuses writes;
unknown header extensions survive a header rewrite byte for byte; the
external data file is supported or refused clearly. Plus the cluster states
whose copy-on-write is easy to get wrong.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import bootcache
from bootcache.errors import BootcacheError, ReadOnlyError, UnsupportedFeatureError

from .conftest import (
    QEMU_IO,
    KiB,
    MiB,
    assert_qemu_check_clean,
    assert_same_bytes,
    bootcache_cli,
    bootcache_read_all,
    qemu_img_check,
    qemu_img_create,
    qemu_img_info,
    qemu_raw_bytes,
    run_qemu_img,
    run_qemu_io,
)

INCOMPAT, COMPAT, AUTOCLEAR = 72, 80, 88


def get_u64(path: Path, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return int.from_bytes(f.read(8), "big")


def set_u64(path: Path, off: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(value.to_bytes(8, "big"))


def header_extensions(path: Path) -> list[tuple[int, bytes]]:
    data = path.read_bytes()[:65536]
    off = int.from_bytes(data[100:104], "big")
    exts = []
    while off + 8 <= len(data):
        etype = int.from_bytes(data[off:off + 4], "big")
        elen = int.from_bytes(data[off + 4:off + 8], "big")
        if etype == 0:
            break
        exts.append((etype, data[off + 8:off + 8 + elen]))
        off += 8 + (elen + 7) // 8 * 8
    return exts


def add_header_extension(path: Path, etype: int, payload: bytes) -> None:
    """Insert an extension before the end marker (qemu leaves room in cluster 0)."""
    data = bytearray(path.read_bytes())
    off = int.from_bytes(data[100:104], "big")
    while int.from_bytes(data[off:off + 4], "big") != 0:
        off += 8 + (int.from_bytes(data[off + 4:off + 8], "big") + 7) // 8 * 8
    padded = payload + bytes(-len(payload) % 8)
    ext = etype.to_bytes(4, "big") + len(payload).to_bytes(4, "big") + padded
    backing_off = int.from_bytes(data[8:16], "big")
    assert backing_off == 0 or backing_off > off + len(ext) + 8
    data[off:off + len(ext) + 8] = ext + bytes(8)
    path.write_bytes(data)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, 4 * MiB)
    run_qemu_io(img, ["write -q -P 0x5a 0 200k", "write -q -c -P 0x5b 1M 64k"])
    return img


def test_unknown_incompatible_bit_refuses_to_open(image: Path) -> None:
    set_u64(image, INCOMPAT, get_u64(image, INCOMPAT) | (1 << 29))
    for writable in (False, True):
        with pytest.raises(UnsupportedFeatureError) as excinfo:
            bootcache.open(str(image), writable=writable)
        msg = str(excinfo.value).lower()
        assert "incompatible" in msg or "feature" in msg, msg
        assert "29" in msg or hex(1 << 29) in msg, f"which feature? {msg}"


def test_unknown_compatible_bit_is_kept(image: Path) -> None:
    set_u64(image, COMPAT, get_u64(image, COMPAT) | (1 << 40))
    with bootcache.open(str(image), writable=True) as disk:
        disk.write(5, b"x")
    assert get_u64(image, COMPAT) & (1 << 40)
    assert_qemu_check_clean(image)


def test_unknown_autoclear_bit_cleared_when_writing(image: Path) -> None:
    set_u64(image, AUTOCLEAR, 1 << 33)
    assert_same_bytes(bootcache_read_all(image), qemu_raw_bytes(image), "read-only open")
    assert get_u64(image, AUTOCLEAR) == 1 << 33, "a read-only open must not touch the header"
    with bootcache.open(str(image), writable=True) as disk:
        disk.write(0, b"autoclear")
    assert get_u64(image, AUTOCLEAR) & (1 << 33) == 0
    assert_qemu_check_clean(image)
    assert qemu_raw_bytes(image)[:10] == b"autoclear\x5a"


def test_unknown_header_extension_kept_byte_for_byte(image: Path) -> None:
    payload = bytes(range(7, 7 + 21))  # length not a multiple of 8
    add_header_extension(image, 0x1234ABCD, payload)
    assert_qemu_check_clean(image)
    before = header_extensions(image)
    assert (0x1234ABCD, payload) in before
    # Make bootcache rewrite the header: an autoclear bit to clear, lazy refcounts to mark.
    set_u64(image, AUTOCLEAR, 1 << 20)
    with bootcache.open(str(image), writable=True) as disk:
        disk.write(4 * KiB, b"ext" * 1000)
        disk.flush()
    after = header_extensions(image)
    assert (0x1234ABCD, payload) in after, after
    assert {t for t, _ in after} == {t for t, _ in before}
    assert_qemu_check_clean(image)


def test_corrupt_bit_refuses_writes_but_reads(image: Path) -> None:
    expected = qemu_raw_bytes(image)
    set_u64(image, INCOMPAT, get_u64(image, INCOMPAT) | 2)
    with pytest.raises(BootcacheError) as excinfo:
        bootcache.open(str(image), writable=True)
    assert "corrupt" in str(excinfo.value).lower()
    assert_same_bytes(bootcache_read_all(image), expected, "reading a corrupt-marked image")
    with bootcache.open(str(image)) as disk, pytest.raises(ReadOnlyError):
        disk.write(0, b"no")


def test_write_to_read_only_open_refused(image: Path) -> None:
    with bootcache.open(str(image)) as disk:
        with pytest.raises(ReadOnlyError):
            disk.write(0, b"x")
        with pytest.raises(ReadOnlyError):
            disk.write_zeroes(0, 512)
        with pytest.raises(ReadOnlyError):
            disk.discard(0, 65536)
    assert qemu_raw_bytes(image)[:1] == b"\x5a"


def _dirty_lazy_image(tmp_path: Path) -> tuple[Path, bytes]:
    """An image with lazy refcounts whose qemu-io writer was SIGKILLed: dirty bit set,
    refcounts on disk stale (qemu-img check without -r reports errors)."""
    img = tmp_path / "dirty.qcow2"
    qemu_img_create(img, 8 * MiB, lazy_refcounts=True)
    cmds = ["write -P 0x42 0 1M", "write -P 0x43 3M 100k", "flush", "write -P 0x44 5M 64k",
            "flush", "sleep 600000"]
    proc = subprocess.Popen([QEMU_IO, "-f", "qcow2", *[a for c in cmds for a in ("-c", c)],
                             str(img)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # Wait until another reader (qemu-img -U) sees the last write: its L2 entry is on disk.
        deadline = time.monotonic() + 20
        while qemu_raw_bytes(img)[5 * MiB:5 * MiB + 64 * KiB] != b"\x44" * (64 * KiB):
            assert time.monotonic() < deadline, "qemu-io never wrote"
            assert proc.poll() is None, f"qemu-io exited with {proc.returncode}"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert get_u64(img, INCOMPAT) & 1, "image is not dirty; the test set-up is wrong"
    assert qemu_img_check(img)["exit-code"] == 2, "qemu-img should see stale refcounts"
    expected = bytearray(8 * MiB)
    expected[0:MiB] = b"\x42" * MiB
    expected[3 * MiB:3 * MiB + 100 * KiB] = b"\x43" * (100 * KiB)
    expected[5 * MiB:5 * MiB + 64 * KiB] = b"\x44" * (64 * KiB)
    return img, bytes(expected)


def test_dirty_image_repaired_or_refused(tmp_path: Path) -> None:
    img, expected = _dirty_lazy_image(tmp_path)
    try:
        disk = bootcache.open(str(img), writable=True)
    except BootcacheError as e:  # refusing is allowed, with a clear word why
        assert "dirty" in str(e).lower() or "repair" in str(e).lower(), str(e)
        return
    # Opened: it must have repaired the refcounts, so new allocations cannot land on
    # clusters that hold data.
    model = bytearray(expected)
    with disk:
        assert_same_bytes(disk.read(0, 8 * MiB), expected, "dirty image contents")
        for i in range(40):
            off = (i * 197 * KiB + 4096 * i) % (8 * MiB - 70 * KiB)
            data = bytes([i + 1]) * (65 * KiB)
            disk.write(off, data)
            model[off:off + len(data)] = data
    assert_qemu_check_clean(img)
    assert_same_bytes(qemu_raw_bytes(img), bytes(model), "after writes into a repaired image")


def test_dirty_image_read_only(tmp_path: Path) -> None:
    img, expected = _dirty_lazy_image(tmp_path)
    try:
        data = bootcache_read_all(img)
    except BootcacheError:
        return
    assert_same_bytes(data, expected, "read-only view of a dirty image")


def test_check_repairs_dirty_image(tmp_path: Path) -> None:
    img, expected = _dirty_lazy_image(tmp_path)
    proc = bootcache_cli("check", "--output", "json", img)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    proc = bootcache_cli("check", "-r", "all", img)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert_qemu_check_clean(img)
    assert_same_bytes(qemu_raw_bytes(img), expected, "after bootcache check -r all")


def test_encrypted_image_refused(tmp_path: Path) -> None:
    img = tmp_path / "aes.qcow2"
    run_qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
                 "-o", "encrypt.format=aes,encrypt.key-secret=sec0", img, "1M")
    with pytest.raises(UnsupportedFeatureError, match=r"(?i)encrypt"):
        bootcache.open(str(img))


def test_external_data_file_supported_or_refused(tmp_path: Path) -> None:
    img = tmp_path / "df.qcow2"
    qemu_img_create(img, 2 * MiB, data_file=str(tmp_path / "df.raw"))  # qemu-img: cwd-relative
    run_qemu_io(img, ["write -q -P 0x66 4096 70000"])
    try:
        data = bootcache_read_all(img)
    except UnsupportedFeatureError as e:
        assert "data file" in str(e).lower() or "data_file" in str(e).lower(), str(e)
        return
    assert_same_bytes(data, qemu_raw_bytes(img), "external data file")


def test_internal_snapshot_clusters_not_overwritten(tmp_path: Path) -> None:
    """Clusters shared with an internal snapshot (refcount 2, no COPIED flag) must be
    copied on write, never written in place."""
    img = tmp_path / "snap.qcow2"
    qemu_img_create(img, 4 * MiB, cluster_size=4096)
    run_qemu_io(img, ["write -q -P 0x31 0 1M", "write -q -c -P 0x32 2M 64k"])
    snap = qemu_raw_bytes(img)
    run_qemu_img("snapshot", "-c", "s1", img)
    try:
        disk = bootcache.open(str(img), writable=True)
    except UnsupportedFeatureError as e:
        assert "snapshot" in str(e).lower(), str(e)
        return
    model = bytearray(snap)
    with disk:
        for off, n in ((100, 10), (4096 * 3, 4096), (MiB - 50, 100), (2 * MiB + 7, 5000)):
            disk.write(off, b"\xee" * n)
            model[off:off + n] = b"\xee" * n
    assert_qemu_check_clean(img)
    assert_same_bytes(qemu_raw_bytes(img), bytes(model), "active layer")
    out = tmp_path / "s1.raw"
    run_qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", img, out)
    assert_same_bytes(out.read_bytes(), snap, "the snapshot must be unchanged")


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_partial_writes_into_special_clusters(tmp_path: Path, compat: str) -> None:
    """Partial writes into: a zero cluster that keeps its allocation (stale data in the
    host cluster must not come back), a zero cluster over backing data, a compressed
    cluster, an unallocated cluster over a backing file that ends mid-cluster."""
    c = 65536
    base = tmp_path / "base.qcow2"
    qemu_img_create(base, 20 * c + 3 * 512, compat=compat)
    run_qemu_io(base, [f"write -q -P 0xb0 0 {20 * c + 3 * 512}"])
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, 24 * c, backing=base.name, backing_fmt="qcow2", compat=compat)
    run_qemu_io(img, [
        f"write -q -P 0xa0 0 {4 * c}",
        f"write -q -z 0 {c}",  # v3: zero flag, allocation kept; v2: zeros written
        f"write -q -z -u {4 * c} {c}",  # zero over backing data
        f"write -q -c -P 0xc0 {8 * c} {c}",  # compressed
    ])
    model = bytearray(qemu_raw_bytes(img))
    writes = [(100, 50), (c - 10, 20), (4 * c + 300, 7), (8 * c + 1000, 3000),
              (20 * c + 100, 2000), (23 * c + 5, 5)]
    with bootcache.open(str(img), writable=True) as disk:
        for off, n in writes:
            disk.write(off, b"\x77" * n)
            model[off:off + n] = b"\x77" * n
        assert_same_bytes(disk.read(0, 24 * c), bytes(model), "before close")
    assert_qemu_check_clean(img)
    assert_same_bytes(qemu_raw_bytes(img), bytes(model), "qemu view")


def test_discard_frees_and_reuses_clusters(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    bootcache.create(str(img), 32 * MiB)
    data = b"\x99" * (16 * MiB)
    with bootcache.open(str(img), writable=True) as disk:
        disk.write(0, data)
        disk.flush()
        full = img.stat().st_size
        disk.discard(0, 16 * MiB)
        assert disk.read(0, 16 * MiB) == bytes(16 * MiB)
        disk.flush()  # frees may wait for the L2 updates to reach the disk
        disk.write(16 * MiB, data)
        disk.flush()
    assert_qemu_check_clean(img)
    # The second 16 MiB reuse the freed clusters instead of growing the file.
    assert img.stat().st_size <= full + MiB, (full, img.stat().st_size)
    raw = qemu_raw_bytes(img)
    assert raw[:16 * MiB] == bytes(16 * MiB) and raw[16 * MiB:] == data


def test_discard_over_backing_v3_reads_zeros(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x12" * (2 * MiB))
    img = tmp_path / "img.qcow2"
    bootcache.create(str(img), 2 * MiB, backing_file="base.raw", backing_fmt="raw")
    with bootcache.open(str(img), writable=True) as disk:
        disk.write(0, b"\x34" * (256 * KiB))
        disk.discard(0, 128 * KiB)  # allocated clusters
        disk.discard(512 * KiB, 128 * KiB)  # never written: backing data underneath
        assert disk.read(0, 128 * KiB) == bytes(128 * KiB)
        assert disk.read(512 * KiB, 128 * KiB) == bytes(128 * KiB)
    assert_qemu_check_clean(img)
    raw = qemu_raw_bytes(img)
    assert raw[:128 * KiB] == bytes(128 * KiB)
    assert raw[128 * KiB:256 * KiB] == b"\x34" * (128 * KiB)
    assert raw[512 * KiB:640 * KiB] == bytes(128 * KiB)
    assert raw[640 * KiB:] == b"\x12" * (2 * MiB - 640 * KiB)


def test_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: one refcount table cluster covers only
    2 MiB of file, so writing 6 MiB must grow the refcount table (maybe more than once)."""
    img = tmp_path / "img.qcow2"
    bootcache.create(str(img), 8 * MiB, cluster_size=512, refcount_bits=64)
    rt_clusters_before = int.from_bytes(img.read_bytes()[56:60], "big")
    model = bytearray(8 * MiB)
    with bootcache.open(str(img), writable=True) as disk:
        for i, off in enumerate(range(0, 6 * MiB, 96 * KiB)):
            chunk = bytes([i % 250 + 1]) * (96 * KiB - 3)
            disk.write(off + 1, chunk)
            model[off + 1:off + 1 + len(chunk)] = chunk
    assert int.from_bytes(img.read_bytes()[56:60], "big") > rt_clusters_before
    assert_qemu_check_clean(img)
    assert_same_bytes(qemu_raw_bytes(img), bytes(model), "after refcount table growth")
    info = json.loads(bootcache_cli("info", "--output", "json", img).stdout)
    assert info["virtual-size"] == qemu_img_info(img)["virtual-size"]
