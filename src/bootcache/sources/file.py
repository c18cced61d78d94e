"""Local file byte source: pread/pwrite on a file descriptor.

Reads and small writes are issued directly from the event loop: on a local
file they are page-cache copies that finish in microseconds, far cheaper
than a thread hop. Large writes (a cache storing what it fetched) and
fdatasync, which can block for long, go to a thread: a write into fresh
page-cache pages can take milliseconds per MiB (on a VM whose host backs
its memory on first touch: BENCHMARKS.md, "Pull time after the pipeline
rework"), and the event loop would spend them not serving reads.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Any

from bootcache.errors import SourceError
from bootcache.sources.base import ByteSource
from bootcache.sources.locking import Perm, lock_image, unlock_image

#: Writes of at least this many bytes are made on a worker thread.
THREAD_WRITE_BYTES = 256 << 10
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def _loop_running() -> bool:
    """Whether an event loop drives this coroutine (commands that step the engine
    without one, block/sync.py, never import asyncio, and write inline)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    # ctypes costs a few ms to import: only files that get holes punched pay it.
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class FileSource(ByteSource):
    """A local file (or block device) opened with QEMU-compatible locks."""

    def __init__(self, path: str, *, writable: bool = False, lock: bool = True,
                 shared: Perm | None = None) -> None:
        self.name = path
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise SourceError(f"{path}: cannot open: {e.strerror}") from e
        if stat.S_ISDIR(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise SourceError(f"{path}: is a directory, not an image")
        self._closed = False
        if lock:
            perms = Perm.CONSISTENT_READ
            if writable:
                perms |= Perm.WRITE | Perm.RESIZE
            if shared is None:
                # Like QEMU: a writer shares only reading; a reader forbids writers.
                shared = (Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED) if writable \
                    else (Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.RESIZE)
            try:
                lock_image(self.fd, path, perms, shared)
            except BaseException:
                os.close(self.fd)
                raise

    def size_now(self) -> int:
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(self.fd, 0, os.SEEK_END)
        return st.st_size

    async def size(self) -> int:
        return self.size_now()

    def pread_now(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # Short read: the rest lies past the end of the file.
            data += b"\0" * (length - len(data))
        return data

    async def pread(self, offset: int, length: int) -> bytes:
        return self.pread_now(offset, length)

    def pwrite_now(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= THREAD_WRITE_BYTES and _loop_running():
            import asyncio

            await asyncio.to_thread(self.pwrite_now, offset, data)
        else:
            self.pwrite_now(offset, data)

    async def flush(self) -> None:
        # Imported here: commands that only read a local image run without an
        # event loop and never pay for asyncio's import.
        import asyncio

        await asyncio.to_thread(os.fdatasync, self.fd)

    def flush_now(self) -> None:
        os.fdatasync(self.fd)

    async def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    async def punch_hole(self, offset: int, length: int) -> bool:
        return _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def identity(self) -> dict[str, Any]:
        st = os.fstat(self.fd)
        return {"kind": "file", "size": st.st_size, "inode": st.st_ino,
                "mtime_ns": st.st_mtime_ns}

    def fingerprint(self) -> object:
        st = os.fstat(self.fd)
        return (st.st_size, st.st_ino, st.st_mtime_ns)

    def sample_hash(self, samples: int = 16, chunk: int = 4096) -> str:
        """Hash of ``samples`` evenly spaced chunks: cheap evidence of content."""
        import hashlib  # only caches identify their base: the rest skip its import

        size = self.size_now()
        h = hashlib.sha256(str(size).encode())
        step = max(size // samples, 1)
        for off in range(0, size, step):
            h.update(self.pread_now(off, min(chunk, size - off)))
        return h.hexdigest()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            unlock_image(self.fd)
            os.close(self.fd)
