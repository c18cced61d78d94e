"""The CLI against qemu-img: ``info``, ``check`` (exit codes, repair) and ``map`` agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    KiB,
    MiB,
    assert_qemu_check_clean,
    assert_same_bytes,
    bootcache_cli,
    qemu_img_check,
    qemu_img_create,
    qemu_img_info,
    qemu_raw_bytes,
    run_qemu_img,
    run_qemu_io,
)


def cli_json(*args: str | Path, expect_rc: int | None = 0) -> Any:
    proc = bootcache_cli(*args)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, (args, proc.returncode, proc.stdout, proc.stderr)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    return json.loads(proc.stdout)


def _u(data: bytes, off: int, width: int) -> int:
    return int.from_bytes(data[off:off + width], "big")


def refcount_entry_offset(path: Path, cluster: int) -> tuple[int, int]:
    """(file offset, width in bytes) of a cluster's refcount entry (refcount_bits >= 8)."""
    data = path.read_bytes()
    cs = 1 << _u(data, 20, 4)
    order = _u(data, 96, 4) if _u(data, 4, 4) >= 3 else 4
    width = (1 << order) // 8
    assert width >= 1
    per_block = cs // width
    rt = _u(data, 48, 8)
    block = _u(data, rt + 8 * (cluster // per_block), 8)
    assert block, "no refcount block for that cluster"
    return block + width * (cluster % per_block), width


def set_refcount(path: Path, cluster: int, value: int) -> None:
    off, width = refcount_entry_offset(path, cluster)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(value.to_bytes(width, "big"))


def data_cluster(path: Path, guest_offset: int) -> int:
    """The host cluster index holding a guest offset (from qemu-img map)."""
    for ext in json.loads(run_qemu_img("map", "--output", "json", path).stdout):
        if ext["start"] <= guest_offset < ext["start"] + ext["length"] and "offset" in ext:
            host: int = ext["offset"] + guest_offset - ext["start"]
            cs: int = qemu_img_info(path)["cluster-size"]
            return host // cs
    raise AssertionError("offset not mapped")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, 8 * MiB)
    run_qemu_io(img, ["write -q -P 0x21 0 1M", "write -q -c -P 0x22 2M 128k",
                      "write -q -z 4M 64k", "write -q -P 0x23 5M 3000"])
    return img


# -- info


INFO_CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("default", {}, None),
    ("v2", {"compat": "0.10", "cluster_size": 512}, None),
    ("lazy-rc64", {"lazy_refcounts": True, "refcount_bits": 64}, None),
    ("rc1-2m", {"refcount_bits": 1, "cluster_size": 2 * MiB}, None),
    ("extl2-zstd", {"extended_l2": True, "compression_type": "zstd"}, None),
    ("backing-raw", {"cluster_size": 4096}, "raw"),
    ("backing-qcow2-v2", {"compat": "0.10"}, "qcow2"),
]


@pytest.mark.parametrize("name, options, backing_fmt", INFO_CASES, ids=[c[0] for c in INFO_CASES])
def test_info_matches_qemu_img(tmp_path: Path, name: str, options: dict[str, Any],
                               backing_fmt: str | None) -> None:
    img = tmp_path / f"{name}.qcow2"
    if backing_fmt:
        base = tmp_path / f"base.{backing_fmt}"
        qemu_img_create(base, 3 * MiB, fmt=backing_fmt)
        qemu_img_create(img, 5 * MiB, backing=base.name, backing_fmt=backing_fmt, **options)
    else:
        qemu_img_create(img, 5 * MiB + 512, **options)
    theirs = qemu_img_info(img)
    ours = cli_json("info", "--output", "json", img)
    for key in ("virtual-size", "cluster-size", "format", "backing-filename",
                "backing-filename-format", "dirty-flag"):
        assert ours.get(key) == theirs.get(key), (key, ours, theirs)
    tdata, odata = theirs["format-specific"]["data"], ours["format-specific"]["data"]
    for key in ("compat", "refcount-bits", "lazy-refcounts", "compression-type",
                "extended-l2", "corrupt"):
        if key == "compression-type" and tdata["compat"] == "0.10":
            continue  # test_info_v2_compression_type
        if key in tdata:
            assert odata.get(key) == tdata[key], (key, odata, tdata)
    human = bootcache_cli("info", img)
    assert human.returncode == 0 and str(theirs["virtual-size"]).encode() in human.stdout


def test_info_v2_compression_type(tmp_path: Path) -> None:
    """qemu-img reports "compression-type": "zlib" for v2 images too."""
    img = tmp_path / "v2.qcow2"
    qemu_img_create(img, MiB, compat="0.10")
    tdata = qemu_img_info(img)["format-specific"]["data"]
    odata = cli_json("info", "--output", "json", img)["format-specific"]["data"]
    assert tdata["compression-type"] == "zlib"
    assert odata.get("compression-type") == tdata["compression-type"], (odata, tdata)


def test_info_backing_chain_and_raw(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img_create(base, 2 * MiB, fmt="raw")
    mid = tmp_path / "mid.qcow2"
    qemu_img_create(mid, backing=base.name, backing_fmt="raw", cluster_size=4096)
    top = tmp_path / "top.qcow2"
    qemu_img_create(top, backing=mid.name, backing_fmt="qcow2")
    theirs = qemu_img_info(top, backing_chain=True)
    ours = cli_json("info", "--output", "json", "--backing-chain", top)
    assert len(ours) == len(theirs) == 3
    for o, t in zip(ours, theirs, strict=True):
        for key in ("format", "virtual-size", "cluster-size", "backing-filename",
                    "backing-filename-format"):
            assert o.get(key) == t.get(key), (key, o, t)
    raw = cli_json("info", "--output", "json", base)
    assert raw["format"] == "raw" and raw["virtual-size"] == 2 * MiB


# -- check


# image-end-offset is compared in its own test below, so that one difference there does
# not hide the others.
CHECK_KEYS = ("check-errors", "corruptions", "leaks", "allocated-clusters", "total-clusters",
              "compressed-clusters")


def assert_check_agrees(img: Path, expect_rc: int) -> dict[str, Any]:
    theirs = qemu_img_check(img)
    assert theirs["exit-code"] == expect_rc, theirs
    ours: dict[str, Any] = cli_json("check", "--output", "json", img, expect_rc=expect_rc)
    for key in CHECK_KEYS:
        assert ours.get(key, 0) == theirs.get(key, 0), (key, ours, theirs)
    return ours


def test_check_clean_image(image: Path) -> None:
    assert_check_agrees(image, 0)
    human = bootcache_cli("check", image)
    assert human.returncode == 0


def test_check_leak_found_and_repaired(image: Path) -> None:
    expected = qemu_raw_bytes(image)
    size = image.stat().st_size
    cs = 65536
    with open(image, "ab") as f:
        f.truncate(size + 2 * cs)
    set_refcount(image, size // cs, 1)
    set_refcount(image, size // cs + 1, 1)
    ours = assert_check_agrees(image, 3)
    assert ours["leaks"] == 2
    proc = bootcache_cli("check", "-r", "leaks", image)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert_qemu_check_clean(image)
    assert_same_bytes(qemu_raw_bytes(image), expected, "after leak repair")


def test_check_image_end_offset(image: Path) -> None:
    """image-end-offset as qemu-img computes it: the end of the last cluster that is
    referenced or has a refcount, so leaked clusters at the end count."""
    assert cli_json("check", "--output", "json", image)["image-end-offset"] == \
        qemu_img_check(image)["image-end-offset"]
    size = image.stat().st_size
    with open(image, "ab") as f:
        f.truncate(size + 3 * 65536)
    set_refcount(image, size // 65536 + 1, 1)
    theirs = qemu_img_check(image)
    assert theirs["image-end-offset"] == size + 2 * 65536
    ours = cli_json("check", "--output", "json", image, expect_rc=3)
    assert ours["image-end-offset"] == theirs["image-end-offset"], (ours, theirs)


def test_check_corruption_found_and_repaired(image: Path) -> None:
    expected = qemu_raw_bytes(image)
    victim = data_cluster(image, 64 * KiB)
    set_refcount(image, victim, 0)
    ours = assert_check_agrees(image, 2)
    assert ours["corruptions"] >= 1
    # -r leaks does not fix corruptions.
    assert bootcache_cli("check", "-r", "leaks", image).returncode == 2
    proc = bootcache_cli("check", "-r", "all", image)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert_qemu_check_clean(image)
    assert_same_bytes(qemu_raw_bytes(image), expected, "after repair")


def test_check_refcount_too_high(image: Path) -> None:
    victim = data_cluster(image, 0)
    set_refcount(image, victim, 2)  # OFLAG_COPIED set but refcount 2: an error for QEMU
    assert_check_agrees(image, 2)
    assert bootcache_cli("check", "-r", "all", image).returncode == 0
    assert_qemu_check_clean(image)


def test_check_not_checkable(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    qemu_img_create(bad, MiB)
    with open(bad, "r+b") as f:
        f.seek(20)
        f.write((99).to_bytes(4, "big"))  # cluster_bits 99
    assert qemu_img_check(bad)["exit-code"] == 1
    proc = bootcache_cli("check", bad)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert b"Traceback" not in proc.stderr
    assert proc.stderr.strip(), "say why"


# -- map


def _segments(extents: list[dict[str, Any]]) -> list[tuple[int, int, tuple[Any, ...]]]:
    """Extents as (start, end, facts) with offsets made per-start and neighbours merged.

    Host-level zero detection (QEMU reports the unwritten tail of an allocated cluster
    as zero when the host file has a hole there) is not compared: for data extents with
    an offset only depth and offset matter."""
    out: list[tuple[int, int, tuple[Any, ...]]] = []
    for e in extents:
        zero = e["zero"] if not (e["data"] and "offset" in e) else None
        facts = (e["depth"], e["present"], zero, e["data"], "offset" in e)
        start, end = e["start"], e["start"] + e["length"]
        base = e.get("offset", 0) - start  # offset of guest byte 0, continuous if equal
        key = (*facts, base if "offset" in e else None)
        if out and out[-1][1] == start and out[-1][2] == key:
            out[-1] = (out[-1][0], end, key)
        else:
            out.append((start, end, key))
    return out


def test_map_matches_qemu_img(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img_create(base, 4 * MiB)
    run_qemu_io(base, ["write -q -P 1 0 2M"])
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, backing=base.name, backing_fmt="qcow2")
    run_qemu_io(img, ["write -q -P 2 64k 64k", "write -q -z 256k 64k",
                      "write -q -c -P 3 512k 64k", "write -q -z -u 1M 128k",
                      "write -q -P 4 3M 1000", "discard -q 64k 64k"])
    theirs = json.loads(run_qemu_img("map", "--output", "json", img).stdout)
    ours = cli_json("map", "--output", "json", img)
    assert _segments(ours) == _segments(theirs), (ours, theirs)
    human = bootcache_cli("map", img)
    assert human.returncode == 0 and human.stdout


def test_map_zero_clusters_that_keep_their_allocation(tmp_path: Path) -> None:
    """qemu-img map gives the host offset of a zero cluster that keeps its allocation
    ("zero": true, "data": false, "offset": ...)."""
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, MiB)
    run_qemu_io(img, ["write -q -P 1 0 256k", "write -q -z 64k 64k"])
    theirs = json.loads(run_qemu_img("map", "--output", "json", img).stdout)
    assert any(e["zero"] and "offset" in e for e in theirs), theirs
    ours = cli_json("map", "--output", "json", img)
    assert _segments(ours) == _segments(theirs), (ours, theirs)


def _corrupt(img: Path, kind: str) -> None:
    data = bytearray(img.read_bytes())
    l1 = _u(bytes(data), 40, 8)
    l2 = _u(bytes(data), l1, 8) & 0x00FFFFFFFFFFFE00
    e0 = _u(bytes(data), l2, 8)
    if kind == "l2-copied-missing":  # refcount 1 but no COPIED flag: QEMU calls it an error
        data[l2:l2 + 8] = (e0 & ~(1 << 63)).to_bytes(8, "big")
    elif kind == "l1-copied-missing":
        e = _u(bytes(data), l1, 8)
        data[l1:l1 + 8] = (e & ~(1 << 63)).to_bytes(8, "big")
    elif kind == "two-l2-entries-one-cluster":  # cluster 1 points at cluster 0's data too
        data[l2 + 8:l2 + 16] = e0.to_bytes(8, "big")
    img.write_bytes(data)
    if kind == "refcount-zero":
        set_refcount(img, data_cluster(img, 0), 0)
    elif kind == "refcount-three":
        set_refcount(img, data_cluster(img, 0), 3)
    elif kind == "leak-in-middle":
        size = img.stat().st_size
        with open(img, "ab") as f:
            f.truncate(size + 3 * 65536)
        set_refcount(img, size // 65536 + 1, 1)


@pytest.mark.parametrize("kind", ["l2-copied-missing", "l1-copied-missing",
                                  "two-l2-entries-one-cluster", "refcount-zero",
                                  "refcount-three", "leak-in-middle"])
def test_check_repair_all_like_qemu_img(tmp_path: Path, kind: str) -> None:
    """``bootcache check -r all`` repairs what ``qemu-img check -r all`` repairs: both
    leave an image qemu-img finds clean, with the same guest data."""
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, 4 * MiB)
    run_qemu_io(img, ["write -q -P 0x31 0 192k", "write -q -P 0x32 1M 64k"])
    _corrupt(img, kind)
    theirs_img = tmp_path / "theirs.qcow2"
    theirs_img.write_bytes(img.read_bytes())
    before = qemu_img_check(img)
    assert before["exit-code"] in (2, 3), before
    ours = bootcache_cli("check", "--output", "json", img)
    assert ours.returncode == before["exit-code"], (ours.stdout, before)
    run_qemu_img("check", "-r", "all", theirs_img, check=False)
    assert_qemu_check_clean(theirs_img)
    proc = bootcache_cli("check", "-r", "all", img)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert_qemu_check_clean(img)
    assert_same_bytes(qemu_raw_bytes(img), qemu_raw_bytes(theirs_img), "repaired contents")
