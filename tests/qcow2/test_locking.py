"""Acceptance 5: image locks refuse a second writer both ways, with clear messages."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import bootcache
from bootcache.errors import ImageLockedError

from .conftest import QEMU_IO, MiB, qemu_img_create, qemu_raw_bytes, run_qemu_io


def _holders(path: Path) -> int:
    """How many OFD locks are held on the image file (from /proc/locks)."""
    ino = path.stat().st_ino
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "OFDLCK" in line and f":{ino} " in line)


@contextmanager
def qemu_io_holding(path: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-io with the image open (stdin a pipe kept open), until the block exits."""
    proc = subprocess.Popen([QEMU_IO, "-f", "qcow2", *extra, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while _holders(path) == 0:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.01)
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()  # end of input: qemu-io quits and closes the image
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def _assert_clear_lock_message(err: Exception, path: Path) -> None:
    msg = str(err)
    assert "lock" in msg.lower(), msg
    assert path.name in msg, f"message does not name the image: {msg}"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "locked.qcow2"
    qemu_img_create(img, 4 * MiB)
    run_qemu_io(img, ["write -q -P 0x61 0 64k"])
    return img


def test_bootcache_refused_while_qemu_io_writes(image: Path) -> None:
    with qemu_io_holding(image):
        with pytest.raises(ImageLockedError) as excinfo:
            bootcache.open(str(image), writable=True)
        _assert_clear_lock_message(excinfo.value, image)
    # Once qemu-io is gone, the same open succeeds.
    with bootcache.open(str(image), writable=True) as disk:
        disk.write(0, b"free")
    assert qemu_raw_bytes(image)[:4] == b"free"


def test_bootcache_refused_while_qemu_io_reads_without_sharing_write(image: Path) -> None:
    # A read-only QEMU user does not share the write permission.
    with qemu_io_holding(image, "-r"), pytest.raises(ImageLockedError) as excinfo:
        bootcache.open(str(image), writable=True)
    _assert_clear_lock_message(excinfo.value, image)


def test_qemu_io_refused_while_bootcache_writes(image: Path) -> None:
    with bootcache.open(str(image), writable=True) as disk:
        disk.write(0, b"mine")
        proc = run_qemu_io(image, ["write -P 0x62 0 512"], check=False)
        assert proc.returncode != 0
        err = (proc.stdout + proc.stderr).decode()
        assert 'Failed to get "write" lock' in err, err
        # qemu-img, too, refuses to write it; reading with force-share still works.
        proc = subprocess.run(["qemu-img", "resize", "-f", "qcow2", str(image), "8M"],
                              capture_output=True, check=False)
        assert proc.returncode != 0 and b"lock" in proc.stderr, proc.stderr
        assert qemu_raw_bytes(image)[:1] in (b"m", b"a")
    # Released on close.
    run_qemu_io(image, ["write -q -P 0x62 0 512"])
    assert qemu_raw_bytes(image)[:512] == b"\x62" * 512


def test_qemu_readers_need_force_share_while_bootcache_writes(image: Path) -> None:
    """As with two QEMU processes: a reader that does not share "write" is refused while
    bootcache writes; with -U (force share) it may read."""
    with bootcache.open(str(image), writable=True):
        for cmd in (["qemu-img", "info", str(image)],
                    [QEMU_IO, "-r", "-c", "read 0 512", str(image)]):
            proc = subprocess.run(cmd, capture_output=True, check=False)
            assert proc.returncode != 0, cmd
            assert b'Failed to get shared "write" lock' in proc.stderr, proc.stderr
        for cmd in (["qemu-img", "info", "-U", str(image)],
                    [QEMU_IO, "-r", "-U", "-c", "read 0 512", str(image)]):
            proc = subprocess.run(cmd, capture_output=True, check=False)
            assert proc.returncode == 0, (cmd, proc.stderr)


def test_bootcache_reader_and_qemu(image: Path) -> None:
    """A read-only bootcache open shares reading but not writing, like qemu-io -r."""
    with bootcache.open(str(image)):
        assert subprocess.run(["qemu-img", "info", str(image)], capture_output=True,
                              check=False).returncode == 0
        proc = run_qemu_io(image, ["write 0 512"], check=False)
        assert proc.returncode != 0 and b'Failed to get "write" lock' in proc.stderr
    with qemu_io_holding(image), pytest.raises(ImageLockedError) as excinfo:
        bootcache.open(str(image))
    _assert_clear_lock_message(excinfo.value, image)


def test_second_bootcache_writer_refused(image: Path) -> None:
    with bootcache.open(str(image), writable=True):
        code = (
            "import sys, bootcache\n"
            "from bootcache.errors import ImageLockedError\n"
            "try:\n"
            "    bootcache.open(sys.argv[1], writable=True)\n"
            "except ImageLockedError as e:\n"
            "    print(e); sys.exit(7)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True,
                              check=False, timeout=60)
        assert proc.returncode == 7, (proc.stdout, proc.stderr)
        assert b"lock" in proc.stdout.lower()


def test_lock_released_when_writer_is_killed(image: Path) -> None:
    code = (
        "import sys, time, bootcache\n"
        "d = bootcache.open(sys.argv[1], writable=True)\n"
        "print('open', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(image)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"open\n"
        assert run_qemu_io(image, ["write 0 512"], check=False).returncode != 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    run_qemu_io(image, ["write -q 0 512"])


def test_cli_reports_lock_clearly(image: Path) -> None:
    """``bootcache check`` on an image qemu-io is writing: an error, not a traceback."""
    with qemu_io_holding(image):
        proc = subprocess.run([sys.executable, "-m", "bootcache", "check", "-r", "all",
                               str(image)], capture_output=True, check=False, timeout=60)
    assert proc.returncode != 0
    assert b"Traceback" not in proc.stderr, proc.stderr
    assert b"lock" in proc.stderr.lower(), proc.stderr
