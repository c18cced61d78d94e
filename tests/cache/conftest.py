"""Helpers for the cache-image acceptance tests (issue 3).

The oracles are real peers: qemu-img / qemu-io read and check the cache
image, nbdkit (with its log filter) and qemu-nbd serve the base, and the
base file itself says what every byte must be. bootcache is driven through
its CLI (``bootcache create``, ``bootcache cache stats``) and its public
Python entry points (``bootcache.open``, ``open_layer``).

Import the plain helpers with ``from .conftest import ...``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
NBDKIT = shutil.which("nbdkit") or "nbdkit"

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB

EXT_CACHE = 0x42434143  # "BCAC", docs/spec/cache-image.md section 2
AUTOCLEAR_CACHE = 1 << 63  # section 3

REPO = Path(__file__).resolve().parents[2]


# -- processes ------------------------------------------------------------------------

def run(cmd: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command, capturing output; with ``check`` a non-zero exit fails the test."""
    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, timeout=timeout,
                          check=False, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout.decode(errors='replace')[-3000:]}\n"
            f"stderr: {proc.stderr.decode(errors='replace')[-3000:]}")
    return proc


def bootcache(*args: str | os.PathLike[str], check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The ``bootcache`` command of this venv."""
    return run([sys.executable, "-m", "bootcache", *args], check=check, env=env)


def child_env(*backing_dirs: str | os.PathLike[str]) -> dict[str, str]:
    """Environment for a child process: src on the path, extra backing folders allowed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if backing_dirs:
        env["BOOTCACHE_BACKING_DIRS"] = ":".join(os.fspath(d) for d in backing_dirs)
    return env


def short_tmpdir() -> str:
    """A fresh folder with a short path, for UNIX sockets (limit ~108 bytes)."""
    return tempfile.mkdtemp(prefix="bc", dir="/tmp")


def wait_for(check: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.02)
    raise TimeoutError(f"{what}: not ready after {timeout}s")


#: QEMU locks byte 100 + bit for each permission it holds; "write" is bit 1.
QEMU_WRITE_LOCK_BYTE = 101


def ofd_locked(path: Path, byte: int) -> bool:
    """Whether an OFD lock on ``path`` covers ``byte``, read from /proc/locks.

    Polling this never takes a lock itself: probing with a second opener
    (``qemu-img info``) would race the holder's own locking and can make it
    fail to open."""
    ino = f":{path.stat().st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # id: OFDLCK ADVISORY READ|WRITE pid dev:inode start end|EOF
        if "OFDLCK" in fields and len(fields) >= 8 and fields[5].endswith(ino):
            end = fields[7]
            if int(fields[6]) <= byte and (end == "EOF" or byte <= int(end)):
                return True
    return False


# -- bases and caches -----------------------------------------------------------------

def make_base(path: Path, size: int, seed: int | str = 0) -> bytes:
    """A base file of random bytes (no all-zero cluster, so holes would show)."""
    data = bytearray(random.Random(seed).randbytes(size))
    for off in range(0, size, 4096):
        data[off] = data[off] | 1
    path.write_bytes(data)
    return bytes(data)


def pattern_base(path: Path, size: int, cluster: int = CLUSTER) -> bytes:
    """A base whose cluster k is filled with the byte ``k % 251 + 1`` (for qemu-io -P)."""
    data = b"".join(bytes([k % 251 + 1]) * cluster for k in range(-(-size // cluster)))[:size]
    path.write_bytes(data)
    return data


def create_cache(cache: Path, backing: str | os.PathLike[str], *, quota: int | str,
                 backing_fmt: str = "raw", policy: str | None = None,
                 on_stale: str | None = None, extra_opts: str = "",
                 use_o: bool = False) -> None:
    """``bootcache create`` a cache image over ``backing``."""
    args: list[str | os.PathLike[str]] = ["create", "-q", "-f", "qcow2"]
    if use_o:
        opts = f"cache_img_quota={quota},backing_file={os.fspath(backing)}"
        if policy:
            opts += f",cache_policy={policy}"
        if on_stale:
            opts += f",cache_on_stale={on_stale}"
        if extra_opts:
            opts += "," + extra_opts
        args += ["-o", opts, "-F", backing_fmt]
    else:
        args += ["--cache-quota", str(quota), "-b", backing, "-F", backing_fmt]
        if policy:
            args += ["--cache-policy", policy]
        if on_stale:
            args += ["--cache-on-stale", on_stale]
        if extra_opts:
            args += ["-o", extra_opts]
    args.append(cache)
    bootcache(*args)


def cache_stats(cache: Path) -> dict[str, Any]:
    """``bootcache cache stats --output json``."""
    result: dict[str, Any] = json.loads(bootcache("cache", "stats", "--output", "json",
                                                  cache).stdout)
    return result


def bootcache_info(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(bootcache("info", "--output", "json", path).stdout)
    return result


# -- QEMU as the oracle ---------------------------------------------------------------

def qemu_map(image: Path) -> list[dict[str, Any]]:
    """``qemu-img map --output json`` (with -U: it takes no lock)."""
    result: list[dict[str, Any]] = json.loads(
        run([QEMU_IMG, "map", "-U", "--output", "json", image]).stdout)
    return result


def cached_extents(image: Path) -> list[tuple[int, int]]:
    """(start, length) of guest data held by the cache image itself (depth 0, data)."""
    return [(e["start"], e["length"]) for e in qemu_map(image)
            if e["depth"] == 0 and e["data"]]


def cached_bytes(image: Path) -> int:
    """Bytes of guest data the cache image holds, as QEMU maps it."""
    return sum(length for _, length in cached_extents(image))


def cached_clusters(image: Path, cluster: int = CLUSTER) -> set[int]:
    out: set[int] = set()
    for start, length in cached_extents(image):
        assert start % cluster == 0, (start, length)
        out.update(range(start // cluster, -(-(start + length) // cluster)))
    return out


def qemu_check(image: Path) -> tuple[int, dict[str, Any]]:
    """``qemu-img check --output json``: (exit code, report)."""
    proc = run([QEMU_IMG, "check", "-U", "--output", "json", image], check=False)
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {"stdout": proc.stdout.decode(errors="replace")}
    report["stderr"] = proc.stderr.decode(errors="replace")
    return proc.returncode, report


def assert_qemu_check(image: Path, *, allow_leaks: bool = False) -> dict[str, Any]:
    """qemu-img check must accept the image: 0, or 3 (leaks only) when allowed."""
    code, report = qemu_check(image)
    ok = (0, 3) if allow_leaks else (0,)
    assert code in ok, f"qemu-img check {image} exited {code}: {report}"
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


def qemu_convert_raw(image: Path) -> bytes:
    """The image's guest-visible bytes as QEMU reads them."""
    outdir = tempfile.mkdtemp(prefix="bcconv")  # not next to the image: it may be full
    out = Path(outdir) / "out.raw"
    try:
        run([QEMU_IMG, "convert", "-U", "-f", "qcow2", "-O", "raw", image, out])
        return out.read_bytes()
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def qemu_io(image: Path, *commands: str, read_only: bool = False,
            check: bool = True) -> subprocess.CompletedProcess[bytes]:
    cmd: list[str | os.PathLike[str]] = [QEMU_IO, "-f", "qcow2"]
    if read_only:
        cmd.append("-r")
    for c in commands:
        cmd += ["-c", c]
    cmd.append(image)
    proc = run(cmd, check=False)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    if check and (proc.returncode != 0 or "fail" in out.lower() or "error" in out.lower()):
        raise AssertionError(f"qemu-io {commands} on {image}: exit {proc.returncode}\n{out}")
    return proc


# -- the header, read independently of bootcache ---------------------------------------

def header_facts(image: Path) -> dict[str, Any]:
    """Autoclear bits and header extensions, parsed from the bytes (qcow2 v3 layout)."""
    raw = image.read_bytes()[:1 << 16]
    assert raw[:4] == b"QFI\xfb", "not a qcow2 image"
    version = struct.unpack_from(">I", raw, 4)[0]
    assert version == 3, version
    autoclear = struct.unpack_from(">Q", raw, 88)[0]
    header_length = struct.unpack_from(">I", raw, 100)[0]
    exts: dict[int, bytes] = {}
    pos = header_length
    while pos + 8 <= len(raw):
        etype, elen = struct.unpack_from(">II", raw, pos)
        if etype == 0:
            break
        exts[etype] = raw[pos + 8:pos + 8 + elen]
        pos += 8 + (elen + 7) // 8 * 8
    return {"autoclear": autoclear, "extensions": exts}


def cache_extension_fields(image: Path) -> dict[str, Any] | None:
    """The cache extension's fields per docs/spec/cache-image.md, or None if absent."""
    data = header_facts(image)["extensions"].get(EXT_CACHE)
    if data is None:
        return None
    (version, flags, quota, policy, high, low, on_stale, hits, misses, from_base, from_cache,
     stored, evictions, used, resets, ident_len) = struct.unpack_from(
        ">IIQBBBB4xQQQQQQQQI4x", data)
    ident = json.loads(data[96:96 + ident_len]) if ident_len else {}
    return dict(version=version, flags=flags, quota=quota, policy=policy, high=high, low=low,
                on_stale=on_stale, hits=hits, misses=misses, bytes_from_base=from_base,
                bytes_from_cache=from_cache, clusters_stored=stored, evictions=evictions,
                used_bytes=used, resets=resets, identity=ident)


# -- byte comparison ------------------------------------------------------------------

def first_difference(actual: bytes, expected: bytes) -> str:
    if len(actual) != len(expected):
        return f"length {len(actual)} != {len(expected)}"
    for off in range(0, len(actual), 4096):
        if actual[off:off + 4096] != expected[off:off + 4096]:
            i = next(i for i in range(off, min(off + 4096, len(actual)))
                     if actual[i] != expected[i])
            return (f"first difference at {i:#x}: got {actual[i:i + 8].hex()}, "
                    f"expected {expected[i:i + 8].hex()}")
    return "equal"


def assert_bytes(actual: bytes, expected: bytes, what: str) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: {first_difference(actual, expected)}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- NBD servers for the base ---------------------------------------------------------

_LOG_READ = re.compile(r"connection=\d+ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+) ")


class Nbdkit:
    """``nbdkit --filter=log file BASE`` on a UNIX socket: every read is logged."""

    def __init__(self, base: Path, sockdir: str) -> None:
        self.socket = os.path.join(sockdir, "kit.sock")
        self.logfile = Path(sockdir) / "reads.log"
        self.pidfile = os.path.join(sockdir, "kit.pid")
        self.uri = f"nbd+unix:///?socket={self.socket}"
        for stale in (self.socket, self.pidfile, self.logfile):
            Path(stale).unlink(missing_ok=True)  # left by a previous server here
        self.proc = subprocess.Popen(
            [NBDKIT, "--foreground", "--exit-with-parent", "-U", self.socket, "-P",
             self.pidfile, "-r", "--filter=log", "file", os.fspath(base),
             f"logfile={self.logfile}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(self.pidfile) or self.proc.poll() is not None, 10,
                 "nbdkit")
        if self.proc.poll() is not None:
            raise RuntimeError(f"nbdkit exited: {self.proc.stderr.read()!r}")  # type: ignore

    def reads(self) -> list[tuple[int, int]]:
        """Every read the base served so far: (offset, count), in log order."""
        if not self.logfile.exists():
            return []
        text = self.logfile.read_text()
        return [(int(m[1], 16), int(m[2], 16)) for m in _LOG_READ.finditer(text)]

    def settle(self) -> list[tuple[int, int]]:
        """The reads, once every logged read has also logged its return."""
        def done() -> bool:
            text = self.logfile.read_text() if self.logfile.exists() else ""
            return text.count(" Read id=") == text.count("...Read id=")
        wait_for(done, 5, "nbdkit log")
        return self.reads()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


class QemuNbd:
    """``qemu-nbd -r -f raw BASE`` on a UNIX socket (persistent: many clients)."""

    def __init__(self, base: Path, sockdir: str) -> None:
        self.socket = os.path.join(sockdir, "qnbd.sock")
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self.proc = subprocess.Popen(
            [QEMU_NBD, "-r", "-f", "raw", "-t", "-e", "16", "-k", self.socket, os.fspath(base)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, 10,
                 "qemu-nbd")
        if self.proc.poll() is not None:
            raise RuntimeError(f"qemu-nbd exited: {self.proc.stderr.read()!r}")  # type: ignore

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def clusters_of(reads: list[tuple[int, int]], cluster: int = CLUSTER) -> dict[int, int]:
    """How many times each cluster was covered by the given base reads."""
    counts: dict[int, int] = {}
    for off, n in reads:
        for ci in range(off // cluster, (off + n - 1) // cluster + 1):
            counts[ci] = counts.get(ci, 0) + 1
    return counts


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture
def sockdir() -> Iterator[str]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Seeded from the test id, so a failure reproduces."""
    return random.Random(request.node.nodeid)
