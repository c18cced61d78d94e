"""Running the engine without an event loop (block/sync.py) and the lock
made on first use (block/lock.py), which together keep asyncio out of
``info``, ``check`` and ``create``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from bootcache.block.lock import LazyAsyncLock
from bootcache.block.sync import NeedsEventLoop, run_without_loop
from bootcache.qcow2.image import Qcow2Image
from bootcache.sources.file import FileSource


def test_a_local_image_is_read_without_a_loop(tmp_path: Path) -> None:
    image = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "3M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 64k 64k", str(image)], check=True,
                   capture_output=True)

    async def read() -> bytes:
        source = FileSource(str(image))
        try:
            img = await Qcow2Image.open(source, name=str(image))
            return await img.pread(0, 192 << 10)
        finally:
            await source.close()

    assert run_without_loop(read()) == bytes(64 << 10) + b"\x5a" * (64 << 10) + \
        bytes(64 << 10)


def test_a_coroutine_that_waits_is_refused_and_closed() -> None:
    cleaned = []

    async def waits() -> None:
        try:
            await asyncio.sleep(0)  # yields to the loop there is not
        finally:
            cleaned.append(True)

    with pytest.raises(NeedsEventLoop, match="waits"):
        run_without_loop(waits())
    assert cleaned == [True]


def test_errors_come_out_as_raised() -> None:
    async def fails() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_without_loop(fails())


def test_the_lazy_lock_excludes_like_an_asyncio_lock() -> None:
    async def main() -> list[str]:
        lock = LazyAsyncLock()
        events: list[str] = []
        inside = asyncio.Event()
        trying = asyncio.Event()

        async def holder() -> None:
            async with lock:
                events.append("holder in")
                inside.set()
                # The waiter sets this, then blocks on the lock without yielding
                # in between: when this returns, the waiter is waiting.
                await trying.wait()
                events.append("holder out")

        async def waiter() -> None:
            await inside.wait()
            assert lock.locked()
            trying.set()
            async with lock:
                events.append("waiter in")

        await asyncio.gather(holder(), waiter())
        assert not lock.locked()
        return events

    assert asyncio.run(main()) == ["holder in", "holder out", "waiter in"]


def test_an_unused_lazy_lock_imports_no_asyncio() -> None:
    code = ("import sys; from bootcache.block.lock import LazyAsyncLock; "
            "lock = LazyAsyncLock(); assert not lock.locked(); "
            "print('asyncio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "False"
