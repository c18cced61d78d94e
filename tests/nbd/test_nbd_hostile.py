"""Hostile and broken clients over a real socket. Each case gets an error
reply or a closed connection for that client alone; afterwards another
client must still be served correctly, and the server's memory stays bounded."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from nbd_testlib import (
    Client,
    client_flags,
    go_data,
    make_file,
    option,
    request,
    rss_kib,
    serve,
    short_tmpdir,
)

from bootcache.nbd import wire as w

SIZE = 16 << 20
# The server may grow this much over its idle size, whatever a client does.
RSS_BUDGET_KIB = 160 << 10


@dataclass
class Served:
    sock: str
    proc: subprocess.Popen[bytes]
    content: bytearray
    baseline_kib: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    img = tmp_path_factory.mktemp("hostile") / "d.raw"
    content = bytearray(make_file(img, SIZE, seed=7))
    sock = os.path.join(short_tmpdir(), "s")
    with serve(f"{img}=d", sock=sock) as proc:
        s = Served(sock, proc, content, 0)
        check_served(s)
        s.baseline_kib = rss_kib(proc.pid)
        yield s
        check_served(s)
    assert proc.returncode == 0


def check_served(s: Served) -> None:
    """Another client is served correctly, and memory is bounded."""
    assert s.proc.poll() is None, "server died"
    with Client(s.sock).connect("d") as c:
        assert c.read(4096, 8192) == bytes(s.content[4096:12288])
        c.write(SIZE - 100, b"still here")
        s.content[SIZE - 100:SIZE - 90] = b"still here"
        assert c.read(SIZE - 100, 10) == b"still here"
    if s.baseline_kib:
        assert rss_kib(s.proc.pid) < s.baseline_kib + RSS_BUDGET_KIB


def raw(s: Served) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(s.sock)
    return sock


def closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    """Drain until EOF; True if the server closed the connection."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    finally:
        sock.close()
    return True


def test_bad_client_flags(served: Served) -> None:
    sock = raw(served)
    sock.recv(18)
    sock.sendall(b"\xff\xff\xff\xff")
    assert closed_by_server(sock)
    check_served(served)


def test_bad_option_magic(served: Served) -> None:
    sock = raw(served)
    sock.recv(18)
    sock.sendall(client_flags() + b"NOTMAGIC" + bytes(8))
    assert closed_by_server(sock)
    check_served(served)


def test_garbage_instead_of_request(served: Served) -> None:
    with Client(served.sock).connect("d") as c:
        c.send(os.urandom(4096))
        assert closed_by_server(c.sock)
    check_served(served)


def test_unknown_options_and_commands_get_errors(served: Served) -> None:
    c = Client(served.sock)
    c.greeting()
    assert c.option(1234, b"whatever")[-1].reply == w.REP_ERR_UNSUP
    assert c.option(w.OPT_GO, go_data("no-such-export"))[-1].reply == w.REP_ERR_UNKNOWN
    assert c.option(w.OPT_GO, b"\xff\xff\xff\xff\0\0")[-1].reply == w.REP_ERR_INVALID
    assert c.option(w.OPT_STARTTLS)[-1].reply == w.REP_ERR_POLICY
    with c:
        assert c.option(w.OPT_STRUCTURED_REPLY)[-1].reply == w.REP_ACK
        assert c.option(w.OPT_GO, go_data("d"))[-1].reply == w.REP_ACK
        assert c.command(99, 0, 0).error == w.EINVAL
        assert c.command(w.CMD_READ, 0, 16, flags=0x400).error == w.EINVAL
        assert c.command(w.CMD_BLOCK_STATUS, 0, 16).error == w.EINVAL  # no contexts
        assert c.read(0, 16) == bytes(served.content[:16])
    check_served(served)


def test_lengths_past_the_end(served: Served) -> None:
    with Client(served.sock).connect("d") as c:
        assert c.command(w.CMD_READ, SIZE - 10, 11).error == w.EINVAL
        assert c.command(w.CMD_READ, 2**64 - 1, 1).error == w.EINVAL
        assert c.command(w.CMD_WRITE, SIZE - 1, 2, data=b"zz").error == w.ENOSPC
        assert c.command(w.CMD_WRITE_ZEROES, SIZE, 4096).error == w.ENOSPC
        assert c.command(w.CMD_TRIM, 2**63, 4096).error == w.ENOSPC
        assert c.command(w.CMD_CACHE, SIZE, 1).error == w.EINVAL
        assert c.command(w.CMD_READ, 0, 64 << 20).error == w.EINVAL  # over the maximum
        assert c.read(SIZE - 10, 10) == bytes(served.content[-10:])
    check_served(served)


def test_huge_write_closes_without_allocating(served: Served) -> None:
    with Client(served.sock).connect("d") as c:
        c.send(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 1, 0, 0xFFFFFFFF))
        try:
            for _ in range(64):
                c.send(bytes(1 << 20))
        except OSError:
            pass  # closed by the server while we were still sending
        assert closed_by_server(c.sock)
    check_served(served)


def test_disconnect_mid_request(served: Served) -> None:
    # Mid-handshake, mid-option, mid-header, mid-payload, with reads in flight.
    cuts = [b"", client_flags()[:2], client_flags() + option(w.OPT_GO, go_data("d"))[:20]]
    for cut in cuts:
        sock = raw(served)
        sock.sendall(cut)
        sock.close()
    for tail in (request(w.CMD_READ, 1, 0, 512)[:13],
                 request(w.CMD_WRITE, 2, 0, data=b"x" * (1 << 20))[:300_000],
                 request(w.CMD_READ, 3, 0, 1 << 20) * 50):
        c = Client(served.sock).connect("d")
        c.send(tail)
        c.sock.close()
    time.sleep(0.3)
    check_served(served)
    with Client(served.sock).connect("d") as c:  # the cut-off write was not applied
        assert c.read(0, 16) == bytes(served.content[:16])


def test_slow_reader_is_throttled(served: Served) -> None:
    """A client that queues 2 GiB of reads and reads no replies must not make
    the server buffer them, nor stall anyone else."""
    slow = Client(served.sock).connect("d")
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    burst = b"".join(request(w.CMD_READ, h, (h % 16) << 20, 1 << 20) for h in range(2048))
    slow.sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 3
    while sent < len(burst) and time.monotonic() < deadline:
        try:
            sent += slow.sock.send(burst[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    time.sleep(0.5)
    start = time.monotonic()
    check_served(served)  # includes the memory bound
    assert time.monotonic() - start < 5
    slow.sock.close()
    time.sleep(0.2)
    check_served(served)


def test_oversized_option_is_refused_not_buffered(served: Served) -> None:
    c = Client(served.sock)
    c.greeting()
    c.send(w.OPTION_HEADER.pack(w.IHAVEOPT, w.OPT_LIST, 200 << 20))
    for _ in range(200):
        c.send(bytes(1 << 20))
    _, _, rep, length = w.OPTION_REPLY.unpack(c.recv_exact(20))
    assert rep == w.REP_ERR_TOO_BIG
    c.recv_exact(length)
    assert c.option(w.OPT_GO, go_data("d"))[-1].reply == w.REP_ACK
    assert c.read(0, 8) == bytes(served.content[:8])
    c.close()
    check_served(served)


def test_many_abandoned_connections(served: Served) -> None:
    socks = [raw(served) for _ in range(100)]
    for i, s in enumerate(socks):
        if i % 2:
            s.sendall(client_flags())
    check_served(served)
    for s in socks:
        s.close()
    check_served(served)
