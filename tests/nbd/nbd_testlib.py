"""Test helpers: NBD client-side byte builders, a reply parser, a small
blocking client, and a way to run ``bootcache serve`` as a subprocess."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bootcache.block.layer import BlockLayer, Extent
from bootcache.nbd import wire as w

ROOT = Path(__file__).resolve().parents[2]


# --- byte builders ----------------------------------------------------------------
def client_flags(flags: int = w.FLAG_C_FIXED_NEWSTYLE | w.FLAG_C_NO_ZEROES) -> bytes:
    return w.CLIENT_FLAGS.pack(flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return w.OPTION_HEADER.pack(w.IHAVEOPT, opt, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (w.U32.pack(len(raw)) + raw + w.U16.pack(len(infos))
            + b"".join(w.U16.pack(i) for i in infos))


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = w.U32.pack(len(raw)) + raw + w.U32.pack(len(queries))
    for q in queries:
        out += w.U32.pack(len(q.encode())) + q.encode()
    return out


def request(cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"") -> bytes:
    if cmd == w.CMD_WRITE and not length:
        length = len(data)
    return w.REQUEST.pack(w.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


# --- reply parsing ------------------------------------------------------------------
@dataclass
class OptionReply:
    option: int
    reply: int
    data: bytes


@dataclass
class Reply:
    """A whole reply to one request (all structured chunks gathered)."""

    handle: int
    error: int = 0
    data: bytes = b""
    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)  # flags, type, payload
    message: str = ""


def parse_option_replies(buf: bytes) -> tuple[list[OptionReply], bytes]:
    """Split complete option replies off the front of ``buf``."""
    out = []
    while len(buf) >= w.OPTION_REPLY.size:
        magic, opt, rep, length = w.OPTION_REPLY.unpack_from(buf)
        assert magic == w.OPTION_REPLY_MAGIC, hex(magic)
        if len(buf) < 20 + length:
            break
        out.append(OptionReply(opt, rep, buf[20:20 + length]))
        buf = buf[20 + length:]
    return out, buf


def parse_replies(buf: bytes, read_lengths: dict[int, int]) -> tuple[list[Reply], bytes]:
    """Split complete transmission replies off ``buf``. ``read_lengths``
    gives the data length of outstanding simple-reply READs by handle."""
    done: list[Reply] = []
    partial: dict[int, Reply] = {}
    while len(buf) >= 4:
        (magic,) = w.U32.unpack_from(buf)
        if magic == w.SIMPLE_REPLY_MAGIC:
            if len(buf) < 16:
                break
            _, error, handle = w.SIMPLE_REPLY.unpack_from(buf)
            n = read_lengths.get(handle, 0) if not error else 0
            if len(buf) < 16 + n:
                break
            done.append(Reply(handle, error, buf[16:16 + n]))
            buf = buf[16 + n:]
        elif magic == w.STRUCTURED_REPLY_MAGIC:
            if len(buf) < 20:
                break
            _, flags, typ, handle, length = w.STRUCTURED_REPLY.unpack_from(buf)
            if len(buf) < 20 + length:
                break
            payload = buf[20:20 + length]
            buf = buf[20 + length:]
            r = partial.setdefault(handle, Reply(handle))
            r.chunks.append((flags, typ, payload))
            if typ == w.REPLY_TYPE_OFFSET_DATA:
                r.data += payload[8:]
            elif typ & 0x8000:
                r.error, mlen = w.ERROR_PAYLOAD.unpack_from(payload)
                r.message = payload[6:6 + mlen].decode()
            if flags & w.REPLY_FLAG_DONE:
                done.append(partial.pop(handle))
        else:
            raise AssertionError(f"bad reply magic {magic:#x}")
    assert not partial, "incomplete structured reply left in buffer"
    return done, buf


# --- a blocking client ----------------------------------------------------------------
class Client:
    """A minimal NBD client over a UNIX socket, for tests."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False
        self.size = 0
        self.flags = 0
        self.contexts: dict[int, str] = {}
        self._handle = 0

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("server closed the connection")
            out += chunk
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def greeting(self) -> None:
        magic, opt, _ = w.GREETING.unpack(self.recv_exact(18))
        assert (magic, opt) == (w.NBDMAGIC, w.IHAVEOPT)
        self.send(client_flags())

    def option(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; collect replies up to the final one."""
        self.send(option(opt, data))
        out = []
        while True:
            magic, o, rep, length = w.OPTION_REPLY.unpack(self.recv_exact(20))
            assert magic == w.OPTION_REPLY_MAGIC and o == opt
            out.append(OptionReply(o, rep, self.recv_exact(length)))
            if rep == w.REP_ACK or rep & w.REP_ERR_BIT:
                return out

    def connect(self, name: str = "", structured: bool = True,
                contexts: tuple[str, ...] = ()) -> Client:
        self.greeting()
        if structured:
            assert self.option(w.OPT_STRUCTURED_REPLY)[-1].reply == w.REP_ACK
            self.structured = True
        if contexts:
            for r in self.option(w.OPT_SET_META_CONTEXT, meta_data(name, list(contexts))):
                if r.reply == w.REP_META_CONTEXT:
                    self.contexts[w.U32.unpack_from(r.data)[0]] = r.data[4:].decode()
        replies = self.option(w.OPT_GO, go_data(name))
        assert replies[-1].reply == w.REP_ACK, replies
        for r in replies:
            if r.reply == w.REP_INFO and w.U16.unpack_from(r.data)[0] == w.INFO_EXPORT:
                _, self.size, self.flags = w.INFO_EXPORT_PAYLOAD.unpack(r.data)
        return self

    def next_handle(self) -> int:
        self._handle += 1
        return self._handle

    def reply(self, read_length: int = 0) -> Reply:
        """Read one whole reply (structured chunks gathered)."""
        head = self.recv_exact(4)
        (magic,) = w.U32.unpack(head)
        if magic == w.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            return Reply(handle, error, self.recv_exact(read_length) if not error else b"")
        assert magic == w.STRUCTURED_REPLY_MAGIC, hex(magic)
        buf = bytearray()
        header = head + self.recv_exact(16)
        while True:
            _, flags, _, _, length = w.STRUCTURED_REPLY.unpack(header)
            buf += header + self.recv_exact(length)
            if flags & w.REPLY_FLAG_DONE:
                break
            header = self.recv_exact(20)
        replies, left = parse_replies(bytes(buf), {})
        assert len(replies) == 1 and not left
        return replies[0]

    def command(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                data: bytes = b"") -> Reply:
        handle = self.next_handle()
        self.send(request(cmd, handle, offset, length, flags, data))
        r = self.reply(length if cmd == w.CMD_READ else 0)
        assert r.handle == handle
        return r

    def read(self, offset: int, length: int) -> bytes:
        r = self.command(w.CMD_READ, offset, length)
        assert r.error == 0, r
        return r.data

    def write(self, offset: int, data: bytes) -> None:
        r = self.command(w.CMD_WRITE, offset, len(data), data=data)
        assert r.error == 0, r

    def close(self) -> None:
        try:
            self.send(request(w.CMD_DISC, self.next_handle()))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- running the server ---------------------------------------------------------------
def short_tmpdir() -> str:
    """A directory short enough for UNIX socket paths (107-byte limit)."""
    return tempfile.mkdtemp(prefix="nbd.", dir="/tmp")


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"bootcache serve exited with {proc.returncode}: {err}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"bootcache serve did not listen on {path}")


@contextmanager
def serve(*args: str, sock: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``bootcache serve --socket SOCK ARGS...``; stop it with SIGTERM."""
    cmd = [sys.executable, "-m", "bootcache.cli.serve", "--socket", sock, *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def need(*tools: str) -> str | None:
    """A skip reason if a tool is missing, else None."""
    missing = [t for t in tools if shutil.which(t) is None]
    return f"needs {', '.join(missing)} (not installed)" if missing else None


def uri(sock: str, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def make_file(path: str | os.PathLike[str], size: int, seed: int = 1) -> bytes:
    """A file of pseudo-random bytes (reproducible); returns its content."""
    import random

    data = random.Random(seed).randbytes(size)
    Path(path).write_bytes(data)
    return data


class MemLayer(BlockLayer):
    """An in-memory sparse disk: 64 KiB blocks are holes until written.
    ``delay`` makes every read wait (to exercise out-of-order replies)."""

    BLOCK = 64 << 10

    def __init__(self, size: int, *, read_only: bool = False, delay: float = 0.0) -> None:
        self.name = "mem"
        self.data = bytearray(size)
        self.allocated: set[int] = set()
        self._read_only = read_only
        self.delay = delay
        self.flushes = 0
        self.closed = False
        self.prefetched: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def read_only(self) -> bool:
        return self._read_only

    async def pread(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if self.delay:
            await asyncio.sleep(self.delay)
        return bytes(self.data[offset:offset + length])

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview,
                     *, fua: bool = False) -> None:
        self.check_range(offset, len(data))
        self.data[offset:offset + len(data)] = data
        self.allocated.update(range(offset // self.BLOCK,
                                    (offset + len(data) - 1) // self.BLOCK + 1))

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = True,
                           fua: bool = False) -> None:
        await self.pwrite(offset, bytes(length))

    async def flush(self) -> None:
        self.flushes += 1

    async def prefetch(self, offset: int, length: int) -> None:
        self.prefetched.append((offset, length))

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            block = pos // self.BLOCK
            stop = min((block + 1) * self.BLOCK, end)
            data = block in self.allocated
            if out and out[-1].data == data:
                last = out[-1]
                out[-1] = Extent(last.offset, stop - last.offset, last.data, last.zero,
                                 last.depth)
            else:
                out.append(Extent(pos, stop - pos, data=data, zero=not data,
                                  depth=1 if data else 0))
            pos = stop
        return out

    async def close(self) -> None:
        self.closed = True
