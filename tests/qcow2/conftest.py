"""Helpers for the qcow2 acceptance tests: real qemu-img / qemu-io as the oracle.

Every helper here talks to QEMU's tools, never to bootcache internals, so the
tests judge the engine only through its public API and CLI. The helpers are
plain functions (import them with ``from .conftest import ...``); a few are
also offered as fixtures.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Every cluster size the format allows, 512 B to 2 MiB.
ALL_CLUSTER_SIZES = [1 << bits for bits in range(9, 22)]
ALL_REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64]


def _fail(what: str, proc: subprocess.CompletedProcess[bytes]) -> None:
    raise AssertionError(
        f"{what} failed with exit code {proc.returncode}\n"
        f"command: {' '.join(map(str, proc.args))}\n"
        f"stdout: {proc.stdout.decode(errors='replace')[-4000:]}\n"
        f"stderr: {proc.stderr.decode(errors='replace')[-4000:]}")


def run(cmd: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command, capturing output; on ``check`` a non-zero exit fails the test."""
    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, timeout=timeout,
                          input=input, check=False)
    if check and proc.returncode != 0:
        _fail(os.fspath(cmd[0]), proc)
    return proc


def run_qemu_img(*args: str | os.PathLike[str], check: bool = True,
                 timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run ``qemu-img ARGS...``."""
    return run([QEMU_IMG, *args], check=check, timeout=timeout)


def run_qemu_io(path: str | os.PathLike[str], commands: Iterable[str], *, fmt: str = "qcow2",
                check: bool = True,
                extra: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
    """Run qemu-io with each command as a ``-c`` argument on one image."""
    cmd: list[str | os.PathLike[str]] = [QEMU_IO, "-f", fmt, *extra]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(path)
    proc = run(cmd, check=False)
    out = proc.stdout + proc.stderr
    if check and (proc.returncode != 0 or b"failed" in out.lower()):
        _fail("qemu-io", proc)
    return proc


def qemu_img_create(path: str | os.PathLike[str], size: int | str | None = None, *,
                    fmt: str = "qcow2", backing: str | os.PathLike[str] | None = None,
                    backing_fmt: str | None = None, **options: Any) -> None:
    """``qemu-img create`` with ``-o key=value`` for every keyword option."""
    cmd: list[str | os.PathLike[str]] = ["create", "-q", "-f", fmt]
    if backing is not None:
        cmd += ["-b", backing]
        if backing_fmt is not None:
            cmd += ["-F", backing_fmt]
    opts = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        opts.append(f"{key}={value}")
    if opts:
        cmd += ["-o", ",".join(opts)]
    cmd.append(path)
    if size is not None:
        cmd.append(str(size))
    run_qemu_img(*cmd)


def qemu_img_info(path: str | os.PathLike[str], *, backing_chain: bool = False) -> Any:
    """``qemu-img info --output json`` (with ``-U`` so that it never takes locks)."""
    args: list[str | os.PathLike[str]] = ["info", "-U", "--output", "json"]
    if backing_chain:
        args.append("--backing-chain")
    return json.loads(run_qemu_img(*args, path).stdout)


def qemu_img_check(path: str | os.PathLike[str], *, fmt: str = "qcow2") -> dict[str, Any]:
    """``qemu-img check --output json``; the exit code is added as ``"exit-code"``."""
    proc = run_qemu_img("check", "-f", fmt, "--output", "json", path, check=False)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = {"stdout": proc.stdout.decode(errors="replace")}
    result["exit-code"] = proc.returncode
    result["stderr"] = proc.stderr.decode(errors="replace")
    return result


def assert_qemu_check_clean(path: str | os.PathLike[str], *, allow_leaks: bool = False) -> None:
    """``qemu-img check`` must find no corruption (and, unless allowed, no leaks)."""
    result = qemu_img_check(path)
    ok_codes = (0, 3) if allow_leaks else (0,)
    assert result["exit-code"] in ok_codes, f"qemu-img check on {path}: {result}"
    assert result.get("corruptions", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    if not allow_leaks:
        assert result.get("leaks", 0) == 0, result


def qemu_raw_bytes(path: str | os.PathLike[str], *, fmt: str | None = None) -> bytes:
    """The guest-visible contents of an image, as QEMU sees them."""
    path = Path(path)
    out = path.with_name(path.name + f".{os.getpid()}.raw")
    try:
        args: list[str | os.PathLike[str]] = ["convert", "-U", "-O", "raw"]
        if fmt is not None:
            args += ["-f", fmt]
        run_qemu_img(*args, path, out)
        return out.read_bytes()
    finally:
        out.unlink(missing_ok=True)


def qemu_img_compare(raw_model: str | os.PathLike[str], image: str | os.PathLike[str]) -> None:
    """``qemu-img compare`` of a raw model file against an image must say identical."""
    proc = run_qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", raw_model, image, check=False)
    if proc.returncode != 0:
        _fail("qemu-img compare", proc)


def bootcache_cli(*args: str | os.PathLike[str],
                  check: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run the ``bootcache`` command of this venv."""
    return run([sys.executable, "-m", "bootcache", *args], check=check)


def bootcache_read_all(path: str | os.PathLike[str], chunk: int = 4 * MiB,
                       **open_options: Any) -> bytes:
    """Every byte of an image through ``bootcache.open`` (read-only)."""
    import bootcache

    with bootcache.open(os.fspath(path), **open_options) as img:
        size = img.size
        out = bytearray()
        for off in range(0, size, chunk):
            data = img.read(off, min(chunk, size - off))
            assert len(data) == min(chunk, size - off), (off, len(data))
            out += data
        return bytes(out)


def first_difference(a: bytes, b: bytes) -> str:
    """A short description of where two byte strings first differ."""
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    if a == b:
        return "equal"
    lo, hi = 0, len(a)
    # Find the first difference by bisection on equal prefixes (fast on big buffers).
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            end = i
            while end < len(a) and a[end] != b[end] and end - i < 1 << 20:
                end += 1
            return (f"first difference at offset {i:#x}: {a[i:i + 16].hex()} != "
                    f"{b[i:i + 16].hex()} (differs for at least {end - i} bytes)")
    return "equal"


def assert_same_bytes(actual: bytes, expected: bytes, what: str = "") -> None:
    if actual != expected:
        raise AssertionError(f"{what}: {first_difference(actual, expected)}")


def random_pattern(rng: random.Random, length: int) -> bytes:
    """Random data, sometimes incompressible, sometimes repetitive, never all zero."""
    kind = rng.randrange(3)
    if kind == 0:
        data = rng.randbytes(length)
    elif kind == 1:
        unit = rng.randbytes(rng.randrange(1, 64))
        data = (unit * (length // len(unit) + 1))[:length]
    else:
        data = bytes([rng.randrange(1, 256)]) * length
    if length and not any(data):
        data = b"\x01" + data[1:]
    return data


class DiskModel:
    """A bytearray model of a disk, with bytes whose value is not fully determined.

    ``certainty`` holds, per byte: EXACT (the byte must equal ``data``),
    OR_ZERO (the byte is ``data`` or zero: a partial-cluster discard may or
    may not zero it), ANY (any value: e.g. a v2 discard over a backing file
    may expose the backing file's data).
    """

    EXACT = 0
    OR_ZERO = 1
    ANY = 2

    def __init__(self, initial: bytes) -> None:
        self.data = bytearray(initial)
        self.certainty = bytearray(len(initial))

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data
        self.certainty[offset:offset + len(data)] = bytes(len(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def discard(self, offset: int, length: int, cluster_size: int, *,
                whole_reads_zero: bool) -> None:
        """Model ``discard`` as the contract allows.

        Whole clusters inside the range read as zeros when ``whole_reads_zero``
        (no backing file, or a v3 image); otherwise they may keep their data or
        show the backing file's. The partial head and tail may keep their data
        or read as zeros.
        """
        end = offset + length
        first = -(-offset // cluster_size) * cluster_size
        last = end // cluster_size * cluster_size
        if first >= last:
            self._loosen(offset, end, self.OR_ZERO)
            return
        self._loosen(offset, first, self.OR_ZERO)
        self._loosen(last, end, self.OR_ZERO)
        if whole_reads_zero:
            self.write_zeroes(first, last - first)
        else:
            self._loosen(first, last, self.ANY)

    def _loosen(self, start: int, end: int, level: int) -> None:
        for i in range(start, end):
            if self.certainty[i] < level:
                self.certainty[i] = level

    def check(self, actual: bytes, what: str = "") -> None:
        """Fail unless ``actual`` is a possible content of the modelled disk."""
        assert len(actual) == len(self.data), f"{what}: size {len(actual)} != {len(self.data)}"
        if not any(self.certainty):
            assert_same_bytes(actual, bytes(self.data), what)
            return
        # Compare in blocks; only blocks holding loose bytes are checked per byte.
        block = 4096
        for start in range(0, len(self.data), block):
            end = min(start + block, len(self.data))
            if actual[start:end] == self.data[start:end]:
                continue
            cert = self.certainty[start:end]
            if not any(cert):
                raise AssertionError(
                    f"{what}: mismatch in exact block at {start:#x}: "
                    f"{first_difference(actual[start:end], bytes(self.data[start:end]))}")
            for i in range(start, end):
                a, e, c = actual[i], self.data[i], self.certainty[i]
                if a == e or c == self.ANY or (c == self.OR_ZERO and a == 0):
                    continue
                raise AssertionError(
                    f"{what}: byte at {i:#x} is {a:#04x}, expected {e:#04x}"
                    f"{' or 0' if c == self.OR_ZERO else ''}")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random generator seeded from the test's id, so failures reproduce."""
    return random.Random(request.node.nodeid)
