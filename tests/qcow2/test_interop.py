"""Acceptance 2: data written by one side reads back identically on the other.

bootcache -> QEMU: random writes (many of them partial clusters over a
backing file) through ``bootcache.open(..., writable=True)`` read back with
``qemu-img convert -O raw`` exactly as a bytearray model says.

QEMU -> bootcache: images made by qemu-img with each option, and compressed
images from ``qemu-img convert -c``, after qemu-io writes, write-zeroes and
discards, read back through ``bootcache.open`` exactly as QEMU reads them;
then bootcache writes into them and qemu-img still finds them clean and equal
to the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import bootcache
from bootcache.errors import BackingPolicyError, BootcacheError, UnsupportedFeatureError
from bootcache.layers.chain import ChainPolicy

from .conftest import (
    KiB,
    MiB,
    assert_qemu_check_clean,
    assert_same_bytes,
    bootcache_read_all,
    qemu_img_compare,
    qemu_img_create,
    qemu_raw_bytes,
    random_pattern,
    run_qemu_img,
    run_qemu_io,
)

# --------------------------------------------------------------------------
# helpers


def random_extent(rng: random.Random, size: int, cluster: int) -> tuple[int, int]:
    """An (offset, length) inside the disk, biased towards cluster edges."""
    kind = rng.randrange(6)
    if kind == 0:  # tiny, anywhere
        length = rng.randrange(1, 64)
        off = rng.randrange(0, size - length)
    elif kind == 1:  # whole clusters
        n = rng.randrange(1, max(2, min(8, size // cluster)))
        off = rng.randrange(0, size // cluster - n + 1) * cluster
        length = n * cluster
    elif kind == 2:  # straddling a cluster boundary
        boundary = rng.randrange(1, size // cluster) * cluster
        off = boundary - rng.randrange(1, min(cluster, 8192) + 1)
        length = min(size - off, boundary - off + rng.randrange(1, min(cluster, 8192) + 1))
    elif kind == 3:  # sector aligned
        length = rng.randrange(1, 64) * 512
        off = rng.randrange(0, (size - length) // 512 + 1) * 512
    elif kind == 4:  # the very end of the disk
        length = rng.randrange(1, min(size, 3 * cluster, 256 * KiB))
        off = size - length
    else:  # anything, up to a few clusters
        length = rng.randrange(1, min(size, 3 * cluster + 1, 512 * KiB))
        off = rng.randrange(0, size - length + 1)
    return off, length


def fill_backing(rng: random.Random, path: Path, fmt: str, size: int) -> bytes:
    """Create a backing file whose every cluster holds non-zero, position-dependent data."""
    content = bytearray(size)
    for off in range(0, size, 64 * KiB):
        n = min(64 * KiB, size - off)
        content[off:off + n] = random_pattern(rng, n)
    raw = path.with_suffix(".src")
    raw.write_bytes(content)
    if fmt == "raw":
        raw.rename(path)
    else:
        run_qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
        raw.unlink()
    return bytes(content)


# --------------------------------------------------------------------------
# bootcache writes, QEMU reads


@dataclass(frozen=True)
class WriteCase:
    name: str
    size: int
    cluster_size: int = 65536
    compat: str = "1.1"
    refcount_bits: int = 16
    backing_fmt: str | None = None
    backing_size: int | None = None  # default: same as the image
    lazy_refcounts: bool = False
    ops: int = 60


WRITE_CASES = [
    WriteCase("default", 8 * MiB),
    WriteCase("cs512-rc1", 2 * MiB, cluster_size=512, refcount_bits=1, ops=150),
    WriteCase("cs512-backing", 3 * MiB + 512, cluster_size=512, backing_fmt="raw", ops=150),
    WriteCase("cs1k-v2-backing-qcow2", 3 * MiB, cluster_size=1024, compat="0.10",
              backing_fmt="qcow2"),
    WriteCase("cs4k-rc2-backing-raw", 5 * MiB, cluster_size=4096, refcount_bits=2,
              backing_fmt="raw"),
    WriteCase("cs16k-rc64-backing-qcow2", 6 * MiB, cluster_size=16384, refcount_bits=64,
              backing_fmt="qcow2"),
    WriteCase("cs64k-v2-backing-raw", 8 * MiB, compat="0.10", backing_fmt="raw"),
    WriteCase("cs64k-short-backing", 8 * MiB, backing_fmt="raw",
              backing_size=3 * MiB + 5 * 512),
    WriteCase("cs64k-lazy-backing", 8 * MiB, lazy_refcounts=True, backing_fmt="qcow2"),
    WriteCase("cs256k-rc8", 9 * MiB, cluster_size=256 * KiB, refcount_bits=8),
    WriteCase("cs2m-backing-qcow2", 16 * MiB, cluster_size=2 * MiB, backing_fmt="qcow2"),
    WriteCase("cs2m-rc32-v2", 12 * MiB + 512, cluster_size=2 * MiB, compat="0.10"),
]


@pytest.mark.parametrize("case", WRITE_CASES, ids=lambda c: c.name)
def test_bootcache_random_writes_read_back_by_qemu(tmp_path: Path, rng: random.Random,
                                                    case: WriteCase) -> None:
    img = tmp_path / "img.qcow2"
    model = bytearray(case.size)
    backing_name = None
    if case.backing_fmt:
        bsize = case.backing_size or case.size
        base = tmp_path / f"base.{case.backing_fmt}"
        model[:bsize] = fill_backing(rng, base, case.backing_fmt, bsize)
        backing_name = base.name
    bootcache.create(str(img), case.size, cluster_size=case.cluster_size, compat=case.compat,
                     refcount_bits=case.refcount_bits, lazy_refcounts=case.lazy_refcounts,
                     backing_file=backing_name, backing_fmt=case.backing_fmt)

    # Two sessions: the second one finds the metadata the first one wrote.
    for session in range(2):
        with bootcache.open(str(img), writable=True) as disk:
            assert disk.size == case.size
            for i in range(case.ops):
                off, length = random_extent(rng, case.size, case.cluster_size)
                if rng.random() < 0.1:
                    disk.write_zeroes(off, length, may_unmap=rng.random() < 0.5)
                    model[off:off + length] = bytes(length)
                else:
                    data = random_pattern(rng, length)
                    disk.write(off, data)
                    model[off:off + length] = data
                if i % 17 == 0:  # read-your-writes inside the session
                    off, length = random_extent(rng, case.size, case.cluster_size)
                    assert_same_bytes(disk.read(off, length), bytes(model[off:off + length]),
                                      f"session {session} op {i} read({off}, {length})")
                if i % 25 == 24:
                    disk.flush()
        assert_qemu_check_clean(img)
        assert_same_bytes(qemu_raw_bytes(img), bytes(model), f"qemu view after session {session}")
    assert_same_bytes(bootcache_read_all(img), bytes(model), "bootcache view")


def test_backing_chain_of_three(tmp_path: Path, rng: random.Random) -> None:
    """raw base <- qcow2 made by qemu-img <- qcow2 made by bootcache, relative names."""
    size = 4 * MiB
    base = tmp_path / "base.raw"
    model = bytearray(fill_backing(rng, base, "raw", size))
    (tmp_path / "sub").mkdir()
    mid = tmp_path / "sub" / "mid.qcow2"
    qemu_img_create(mid, backing="../base.raw", backing_fmt="raw", cluster_size=4096)
    run_qemu_io(mid, ["write -P 0x11 4096 100000", "write -z 1M 64k"])
    model[4096:104096] = b"\x11" * 100000
    model[MiB:MiB + 64 * KiB] = bytes(64 * KiB)
    top = tmp_path / "sub" / "top.qcow2"
    bootcache.create(str(top), size, cluster_size=512, backing_file="mid.qcow2",
                     backing_fmt="qcow2")
    # By default only the top image's folder is allowed; base.raw is outside it.
    with pytest.raises(BackingPolicyError, match=r"base\.raw"):
        bootcache.open(str(top))
    policy = ChainPolicy(allowed_dirs=[str(tmp_path)])
    with bootcache.open(str(top), writable=True, policy=policy) as disk:
        for _ in range(80):
            off, length = random_extent(rng, size, 4096)
            data = random_pattern(rng, length)
            disk.write(off, data)
            model[off:off + length] = data
    assert_qemu_check_clean(top)
    assert_qemu_check_clean(mid)
    assert_same_bytes(qemu_raw_bytes(top), bytes(model), "qemu view of the chain")
    assert_same_bytes(bootcache_read_all(top, policy=policy), bytes(model),
                      "bootcache view of the chain")


def test_hostile_backing_names_refused(tmp_path: Path) -> None:
    """An image must not reach arbitrary host files, nor loop, through its backing name."""
    cases = {
        "abs.qcow2": "/etc/hostname",
        "up.qcow2": "../../../../../../etc/hostname",
        "self.qcow2": "self.qcow2",
        "url.qcow2": "file:///etc/hostname",
    }
    for name, backing in cases.items():
        img = tmp_path / name
        run_qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "raw", img, "1M")
    for name in cases:
        with pytest.raises(BootcacheError) as excinfo:
            bootcache.open(str(tmp_path / name)).close()
        assert "backing" in str(excinfo.value).lower() or name in str(excinfo.value)
    # A loop of two images and a chain deeper than the limit.
    qemu_img_create(tmp_path / "a.qcow2", MiB)
    qemu_img_create(tmp_path / "b.qcow2", MiB, backing="a.qcow2", backing_fmt="qcow2")
    run_qemu_img("rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", tmp_path / "a.qcow2")
    with pytest.raises(BootcacheError):
        bootcache.open(str(tmp_path / "a.qcow2")).close()
    prev = "a0.qcow2"
    qemu_img_create(tmp_path / prev, MiB)
    for i in range(1, 40):
        qemu_img_create(tmp_path / f"a{i}.qcow2", backing=prev, backing_fmt="qcow2")
        prev = f"a{i}.qcow2"
    with pytest.raises(BootcacheError):
        bootcache.open(str(tmp_path / prev)).close()


def test_raw_image_is_opened_as_raw(tmp_path: Path, rng: random.Random) -> None:
    img = tmp_path / "disk.img"
    content = bytearray(rng.randbytes(MiB + 512))
    img.write_bytes(content)
    with bootcache.open(str(img), writable=True) as disk:
        assert disk.size == len(content)
        disk.write(1000, b"raw!" * 300)
        content[1000:2200] = b"raw!" * 300
    assert img.read_bytes() == content
    assert bootcache_read_all(img) == content


# --------------------------------------------------------------------------
# QEMU writes, bootcache reads


@dataclass(frozen=True)
class QemuCase:
    name: str
    size: int
    options: dict[str, Any] = field(default_factory=dict)
    backing_fmt: str | None = None

    @property
    def cluster_size(self) -> int:
        return int(self.options.get("cluster_size", 65536))


QEMU_CASES = [
    QemuCase("default", 8 * MiB),
    QemuCase("cs512", 2 * MiB, {"cluster_size": 512}),
    QemuCase("cs4k-rc1", 4 * MiB, {"cluster_size": 4096, "refcount_bits": 1}),
    QemuCase("cs2m-rc64", 16 * MiB, {"cluster_size": 2 * MiB, "refcount_bits": 64}),
    QemuCase("v2", 8 * MiB, {"compat": "0.10"}),
    QemuCase("v2-cs1k-backing", 3 * MiB, {"compat": "0.10", "cluster_size": 1024}, "qcow2"),
    QemuCase("lazy", 8 * MiB, {"lazy_refcounts": True}),
    QemuCase("rc4-backing-raw", 8 * MiB, {"refcount_bits": 4}, "raw"),
    QemuCase("backing-qcow2", 8 * MiB, {}, "qcow2"),
    QemuCase("extl2", 8 * MiB, {"extended_l2": True}),
    QemuCase("extl2-cs16k-backing", 4 * MiB, {"extended_l2": True, "cluster_size": 16384},
             "raw"),
    QemuCase("extl2-cs2m-backing", 16 * MiB, {"extended_l2": True, "cluster_size": 2 * MiB},
             "qcow2"),
    QemuCase("zstd", 8 * MiB, {"compression_type": "zstd"}),
    QemuCase("prealloc-metadata", 4 * MiB, {"preallocation": "metadata"}),
    QemuCase("v2-prealloc-full-cs4k", 2 * MiB, {"preallocation": "full", "compat": "0.10",
                                                "cluster_size": 4096}),
]


def qemu_io_random_script(rng: random.Random, size: int, cluster: int, pattern_file: Path,
                          *, ops: int, compressed: bool = True) -> list[str]:
    """qemu-io commands: writes with patterns and random data, write -z (-u), discard,
    compressed writes of whole clusters (QEMU compresses only into clusters that hold
    no allocation, so those go to clusters no earlier command touched)."""
    pattern_len = pattern_file.stat().st_size
    nclusters = size // cluster
    touched: set[int] = set()
    cmds = []
    for _ in range(ops):
        off, length = random_extent(rng, size, cluster)
        kind = rng.randrange(10)
        if kind == 8 and compressed:
            n = rng.randrange(1, 4)
            for _attempt in range(10):
                first = rng.randrange(0, nclusters - n + 1)
                if not touched & set(range(first, first + n)):
                    break
            else:
                continue
            touched.update(range(first, first + n))
            coff = first * cluster
            if pattern_len < cluster or rng.random() < 0.5:
                cmds.append(f"write -q -c -P {rng.randrange(1, 256):#x} {coff} {n * cluster}")
            else:
                n = min(n, pattern_len // cluster)
                cmds.append(f"write -q -c -s {pattern_file} {coff} {n * cluster}")
            continue
        if kind in (3, 4):
            length = min(length, pattern_len)
        touched.update(range(off // cluster, (off + length - 1) // cluster + 1))
        if kind in (3, 4):
            cmds.append(f"write -q -s {pattern_file} {off} {length}")
        elif kind == 5:
            cmds.append(f"write -q -z {off} {length}")
        elif kind == 6:
            cmds.append(f"write -q -z -u {off} {length}")
        elif kind == 7:
            cmds.append(f"discard -q {off} {length}")
        else:
            cmds.append(f"write -q -P {rng.randrange(1, 256):#x} {off} {length}")
    return cmds


def _pattern_file(tmp_path: Path, rng: random.Random, length: int) -> Path:
    pf = tmp_path / "pattern.bin"
    # Half random, half compressible, so that compressed clusters hold both.
    half = length // 2
    pf.write_bytes(rng.randbytes(half) + (b"compressible " * (length // 13 + 1))[:length - half])
    return pf


def _bootcache_writes(rng: random.Random, img: Path, model: bytearray, cluster: int,
                      ops: int = 30) -> None:
    """Writes and write-zeroes through bootcache, mirrored into the model."""
    size = len(model)
    with bootcache.open(str(img), writable=True) as disk:
        for _ in range(ops):
            off, length = random_extent(rng, size, cluster)
            if rng.random() < 0.2:
                disk.write_zeroes(off, length, may_unmap=rng.random() < 0.5)
                model[off:off + length] = bytes(length)
            else:
                data = random_pattern(rng, length)
                disk.write(off, data)
                model[off:off + length] = data
        disk.flush()


def _verify_after_bootcache_writes(tmp_path: Path, img: Path, model: bytearray) -> None:
    assert_qemu_check_clean(img)
    raw_model = tmp_path / "model.raw"
    raw_model.write_bytes(model)
    qemu_img_compare(raw_model, img)


@pytest.mark.parametrize("case", QEMU_CASES, ids=lambda c: c.name)
def test_qemu_made_images_read_back_through_bootcache(tmp_path: Path, rng: random.Random,
                                                      case: QemuCase) -> None:
    img = tmp_path / "img.qcow2"
    cluster = case.cluster_size
    if case.backing_fmt:
        base = tmp_path / f"base.{case.backing_fmt}"
        fill_backing(rng, base, case.backing_fmt, case.size)
        qemu_img_create(img, case.size, backing=base.name, backing_fmt=case.backing_fmt,
                        **case.options)
    else:
        qemu_img_create(img, case.size, **case.options)
    pf = _pattern_file(tmp_path, rng, min(4 * cluster, 512 * KiB))
    # Compressed clusters share host clusters: refcounts above 1 need more than one bit.
    # With lazy refcounts, qemu-io 7.2's own compressed writes mixed with other writes can
    # leave an OFLAG_COPIED error that qemu-img check reports, so none there either.
    # Preallocated clusters are allocated: QEMU compresses only into unallocated ones.
    compressed = (case.options.get("refcount_bits", 16) > 1
                  and not case.options.get("lazy_refcounts")
                  and "preallocation" not in case.options)
    script = qemu_io_random_script(rng, case.size, cluster, pf, ops=60, compressed=compressed)
    run_qemu_io(img, script)
    expected = qemu_raw_bytes(img)
    assert_same_bytes(bootcache_read_all(img), expected, "bootcache view of the qemu image")
    # Unaligned reads too.
    with bootcache.open(str(img)) as disk:
        for _ in range(40):
            off, length = random_extent(rng, case.size, cluster)
            assert_same_bytes(disk.read(off, length), expected[off:off + length],
                              f"read({off}, {length})")

    if case.options.get("extended_l2"):
        # Extended L2 entries are supported for reading only: writing must be refused clearly.
        with pytest.raises(UnsupportedFeatureError, match=r"(?i)extended l2"):
            bootcache.open(str(img), writable=True)
        return
    model = bytearray(expected)
    _bootcache_writes(rng, img, model, cluster)
    _verify_after_bootcache_writes(tmp_path, img, model)
    # And QEMU's next writes on top of bootcache's still read back through bootcache.
    run_qemu_io(img, qemu_io_random_script(rng, case.size, cluster, pf, ops=20,
                                           compressed=False))
    assert_same_bytes(bootcache_read_all(img), qemu_raw_bytes(img), "after more qemu-io writes")


@pytest.mark.parametrize("compression_type", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [4096, 65536, 2 * MiB])
def test_compressed_images(tmp_path: Path, rng: random.Random, compression_type: str,
                           cluster_size: int) -> None:
    size = 8 * MiB if cluster_size < 2 * MiB else 16 * MiB
    src = tmp_path / "src.raw"
    content = bytearray(size)
    pos = 0
    while pos < size:  # mixed data: random, repetitive, zero runs
        n = min(size - pos, rng.randrange(1, 6) * 37 * KiB)
        if rng.random() > 0.2:
            content[pos:pos + n] = random_pattern(rng, n)
        pos += n
    src.write_bytes(content)
    img = tmp_path / "img.qcow2"
    run_qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compression_type={compression_type},cluster_size={cluster_size}", src, img)
    run_qemu_img("compare", "-f", "raw", "-F", "qcow2", src, img)
    assert_same_bytes(bootcache_read_all(img), bytes(content), "freshly compressed image")

    pf = _pattern_file(tmp_path, rng, min(4 * cluster_size, 512 * KiB))
    run_qemu_io(img, qemu_io_random_script(rng, size, cluster_size, pf, ops=40,
                                           compressed=False))
    expected = qemu_raw_bytes(img)
    assert_same_bytes(bootcache_read_all(img), expected, "compressed image after qemu-io")

    # bootcache overwrites parts of compressed clusters: copy-on-write from compressed data.
    model = bytearray(expected)
    _bootcache_writes(rng, img, model, cluster_size, ops=40)
    _verify_after_bootcache_writes(tmp_path, img, model)
    assert_same_bytes(bootcache_read_all(img), bytes(model), "bootcache view after writes")


def test_discard_and_zeroes_made_by_qemu_v2_and_v3(tmp_path: Path) -> None:
    """Specific cluster states side by side: zero clusters with and without their
    allocation, unallocated over backing, discarded, compressed."""
    size = 2 * MiB
    c = 65536
    for compat in ("0.10", "1.1"):
        base = tmp_path / f"base{compat}.qcow2"
        qemu_img_create(base, size, compat=compat)
        run_qemu_io(base, [f"write -q -P 0xbb 0 {size}"])
        img = tmp_path / f"img{compat}.qcow2"
        qemu_img_create(img, size, backing=base.name, backing_fmt="qcow2", compat=compat)
        run_qemu_io(img, [
            f"write -q -P 0x01 0 {8 * c}",
            f"write -q -z {c} {c}",  # zero, keeps allocation (v3)
            f"write -q -z -u {2 * c} {c}",  # zero, unmapped
            f"discard -q {3 * c} {c}",  # discard over backing
            f"write -q -z {4 * c + 100} 1000",  # partial zero write
            f"write -q -c -P 0x02 {14 * c} {c}",  # compressed
            f"write -q -z -u {9 * c} {2 * c}",  # zero over backing data, never allocated
            f"discard -q {12 * c + 512} {c}",  # partial discard, nothing allocated
        ])
        assert_same_bytes(bootcache_read_all(img), qemu_raw_bytes(img), f"compat {compat}")


def test_writes_over_a_chain_of_special_clusters(tmp_path: Path, rng: random.Random) -> None:
    """bootcache's copy-on-write reads the old data through a qemu-made chain of an
    extended-L2 image (subclusters: allocated, zero, unallocated) over a compressed
    image over a short raw base; the overlay is larger than every layer below it."""
    c = 65536
    base = tmp_path / "base.raw"
    base.write_bytes(rng.randbytes(3 * MiB + 1536))
    comp_src = tmp_path / "comp.src.qcow2"
    qemu_img_create(comp_src, 5 * MiB, backing=base.name, backing_fmt="raw")
    run_qemu_io(comp_src, ["write -q -P 0x31 1M 1M", "write -q -z 2560k 128k"])
    comp = tmp_path / "comp.qcow2"
    # Compressed clusters for everything the source shows (backing data included).
    run_qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", comp_src, comp)
    run_qemu_img("rebase", "-u", "-b", "", comp)
    ext = tmp_path / "ext.qcow2"
    qemu_img_create(ext, 6 * MiB, backing=comp.name, backing_fmt="qcow2", extended_l2=True)
    run_qemu_io(ext, [f"write -q -P 0x41 {2048 * k} 1000" for k in range(0, 200, 7)]
                + ["write -q -z 100k 6k", "write -q -z -u 300k 70k", "discard -q 1M 64k",
                   f"write -q -P 0x42 {5 * MiB + 4096} 2048"])
    top = tmp_path / "top.qcow2"
    size = 7 * MiB + 512
    bootcache.create(str(top), size, cluster_size=4096, backing_file=ext.name,
                     backing_fmt="qcow2")
    model = bytearray(qemu_raw_bytes(top))
    assert_same_bytes(bootcache_read_all(top), bytes(model), "chain before writes")
    with bootcache.open(str(top), writable=True) as disk:
        for _ in range(150):
            off, length = random_extent(rng, size, c)
            data = random_pattern(rng, length)
            disk.write(off, data)
            model[off:off + length] = data
    assert_qemu_check_clean(top)
    assert_same_bytes(qemu_raw_bytes(top), bytes(model), "qemu view after writes")


def test_backing_format_is_honoured(tmp_path: Path) -> None:
    """A qcow2 file declared as a raw backing file is read as raw bytes, as QEMU does;
    a raw file is never probed into a qcow2 when its format is given."""
    inner = tmp_path / "inner.qcow2"
    qemu_img_create(inner, MiB)
    run_qemu_io(inner, ["write -q -P 0x55 0 64k"])
    img = tmp_path / "img.qcow2"
    run_qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", inner.name, "-F", "raw", img,
                 str(inner.stat().st_size))
    expected = qemu_raw_bytes(img)
    assert expected[:4] == b"QFI\xfb"
    assert_same_bytes(bootcache_read_all(img), expected, "qcow2 bytes as a raw backing file")


def test_many_l2_tables_evicted_and_reloaded(tmp_path: Path, rng: random.Random) -> None:
    """More L2 tables than the engine's bounded L2 cache holds (2 MiB clusters: one table
    maps 512 GiB), written, evicted, reloaded and written again."""
    cs = 2 * MiB
    region = cs // 8 * cs  # guest bytes one L2 table maps
    regions = 40
    size = regions * region
    img = tmp_path / "big.qcow2"
    bootcache.create(str(img), size, cluster_size=cs)
    written: dict[int, bytes] = {}  # guest offset -> data (non-overlapping ranges)
    order = list(range(regions)) + rng.sample(range(regions), regions) + list(range(regions))
    with bootcache.open(str(img), writable=True) as disk:
        for visit, k in enumerate(order):
            off = k * region + visit * 2 * cs + rng.randrange(0, cs - 5000)  # never overlap
            data = bytes([visit % 250 + 1]) * rng.randrange(1, 5000)
            disk.write(off, data)
            written[off] = data
            if visit % 25 == 24:
                disk.flush()
        for off, data in written.items():
            assert disk.read(off, len(data)) == data, off
        # Drop a few: zeroes and discards on whole clusters free host clusters.
        for off in list(written)[::10]:
            start = off // cs * cs
            if rng.random() < 0.5:
                disk.discard(start, cs)
            else:
                disk.write_zeroes(start, cs)
            for o in [o for o in written if start <= o < start + cs]:
                del written[o]
    assert_qemu_check_clean(img)
    cmds = [f"read -q -P {data[0]:#x} {off} {len(data)}" for off, data in written.items()]
    cmds += [f"read -q -P 0 {k * region + 100 * cs} 4096" for k in range(regions)]
    run_qemu_io(img, cmds)
    with bootcache.open(str(img)) as disk:
        for off, data in written.items():
            assert disk.read(off, len(data)) == data, off


def test_compressed_clusters_count_as_allocated(tmp_path: Path, rng: random.Random) -> None:
    """In a compressed L2 entry bit 0 belongs to the host offset: the allocated
    clusters bootcache lists must be the ones qemu-img maps as data."""
    import asyncio
    import json

    from bootcache.qcow2.image import Qcow2Image
    from bootcache.sources.file import FileSource

    cluster = 4096
    src, img = tmp_path / "src.raw", tmp_path / "img.qcow2"
    # Each cluster compresses to a different length, so that compressed
    # clusters start at odd host offsets too.
    src.write_bytes(b"".join(rng.randbytes(n).ljust(cluster, b"\0")
                             for n in (rng.randrange(100, 3000) for _ in range(512))))
    run_qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compression_type=zstd,cluster_size={cluster}", src, img)
    extents = json.loads(run_qemu_img("map", "--output=json", img).stdout)
    expected = sorted(c for e in extents if e["data"] and not e["zero"]
                      for c in range(e["start"] // cluster, (e["start"] + e["length"]) // cluster))

    async def listed() -> list[int]:
        image = await Qcow2Image.open(FileSource(str(img)))
        try:
            return sorted(await image.allocated_clusters())
        finally:
            await image.close()

    assert expected and asyncio.run(listed()) == expected
