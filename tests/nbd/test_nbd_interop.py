"""``bootcache serve`` against real NBD clients: qemu-io, qemu-img, nbdinfo,
nbdcopy; plus in-process server behaviour (out-of-order replies, shutdown)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import InProcess
from nbd_testlib import Client, MemLayer, make_file, need, serve, uri

from bootcache.block.layer import Extent
from bootcache.nbd import wire as w


def run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if ok:
        assert p.returncode == 0, f"{cmd}: {p.stdout}{p.stderr}"
    return p


QEMU_IO_OPS = [
    "write -P 0x5a 0 64k",
    "write -P 0xa5 1000 3000",  # unaligned
    "write -z 1M 512k",
    "write -z -u 2M 128k",  # may unmap
    "write -f -P 0x11 4M 4k",  # FUA
    "discard 3M 64k",
    "aio_write -P 0x21 5M 64k",  # concurrent requests
    "aio_write -P 0x22 6M 64k",
    "aio_write -z 7M 64k",
    "aio_flush",
    "flush",
    "read -P 0x5a 0 1000",
    "read -P 0x22 6M 64k",
    "read -P 0 1M 512k",
]


def qemu_io(target: str, ops: list[str]) -> str:
    args = ["qemu-io", "-f", "raw"]
    for op in ops:
        args += ["-c", op]
    p = run(*args, target)
    assert "error" not in p.stdout.lower() and "fail" not in p.stdout.lower(), p.stdout
    return p.stdout


@pytest.mark.skipif(bool(need("qemu-io", "qemu-img")), reason=str(need("qemu-io", "qemu-img")))
def test_qemu_io_matches_local(tmp_path: Path, sockdir: str) -> None:
    served, local = tmp_path / "served.raw", tmp_path / "local.raw"
    make_file(served, 8 << 20)
    shutil.copy(served, local)
    sock = f"{sockdir}/s"
    with serve(f"{served}=vm", sock=sock):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        qemu_io(uri(sock, "vm"), QEMU_IO_OPS)
        qemu_io(str(local), QEMU_IO_OPS)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(local), uri(sock, "vm"))
        # While served, the image is locked against other writers, as in QEMU.
        p = run("qemu-io", "-f", "raw", "-c", "write 0 512", str(served), ok=False)
        assert p.returncode != 0 and "lock" in (p.stdout + p.stderr).lower()
    # After SIGTERM, the file holds the same data and the lock is gone.
    assert served.read_bytes() == local.read_bytes()
    run("qemu-io", "-f", "raw", "-c", "write 0 512", str(served))


@pytest.mark.skipif(bool(need("qemu-img")), reason=str(need("qemu-img")))
def test_qemu_img_info_and_convert(tmp_path: Path, sockdir: str) -> None:
    src = tmp_path / "src.raw"
    content = make_file(src, 4 << 20, seed=2)
    target = tmp_path / "target.raw"
    target.write_bytes(bytes(4 << 20))
    sock = f"{sockdir}/s"
    with serve(f"{src}=src", f"{target}=dst", sock=sock):
        info = json.loads(run("qemu-img", "info", "--output=json", uri(sock, "src")).stdout)
        assert info["virtual-size"] == 4 << 20
        out = tmp_path / "out.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri(sock, "src"), str(out))
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out), str(src))
        # And into an export: qemu-img writes, zeroes and flushes over NBD.
        run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(out),
            uri(sock, "dst"))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock, "dst"), str(src))
    assert target.read_bytes() == content


@pytest.mark.skipif(bool(need("nbdinfo")), reason=str(need("nbdinfo")))
def test_nbdinfo_list(tmp_path: Path, sockdir: str) -> None:
    make_file(tmp_path / "a.raw", 1 << 20)
    make_file(tmp_path / "b.qcow2.raw", 2 << 20)
    sock = f"{sockdir}/s"
    with serve("--read-only", str(tmp_path / "a.raw"), f"{tmp_path / 'b.qcow2.raw'}=b",
               sock=sock):
        listing = json.loads(run("nbdinfo", "--list", "--json", uri(sock)).stdout)
        exports = {e["export-name"]: e for e in listing["exports"]}
        assert set(exports) == {"a.raw", "b"}
        assert exports["b"]["export-size"] == 2 << 20
        assert exports["a.raw"]["is_read_only"] is True
        assert "base:allocation" in exports["a.raw"]["contexts"]
        assert exports["a.raw"]["can_multi_conn"] is True
        p = run("nbdinfo", "--map", uri(sock, "a.raw"))
        assert p.stdout.split() == ["0", str(1 << 20), "0", "data"]


@pytest.mark.skipif(bool(need("nbdinfo")), reason=str(need("nbdinfo")))
def test_nbdinfo_map_shows_allocation(inproc: Callable[..., InProcess]) -> None:
    layer = MemLayer(1 << 20)
    srv: InProcess = inproc({"mem": layer})
    with Client(srv.path).connect("mem") as c:
        c.write(128 << 10, b"x" * 1000)
        c.write(512 << 10, b"y" * (128 << 10))
    extents = json.loads(run("nbdinfo", "--map", "--json", uri(srv.path, "mem")).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in extents]
    hole = w.STATE_HOLE | w.STATE_ZERO
    assert got == [(0, 128 << 10, hole), (128 << 10, 64 << 10, 0),
                   (192 << 10, 320 << 10, hole), (512 << 10, 128 << 10, 0),
                   (640 << 10, 384 << 10, hole)]
    depth = run("nbdinfo", "--map=qemu:allocation-depth", "--json", uri(srv.path, "mem"))
    assert [(e["offset"], e["type"]) for e in json.loads(depth.stdout)][:2] == [
        (0, 0), (128 << 10, 1)]


@pytest.mark.skipif(bool(need("nbdcopy")), reason=str(need("nbdcopy")))
def test_nbdcopy_exact(tmp_path: Path, sockdir: str) -> None:
    src = tmp_path / "src.raw"
    content = make_file(src, 24 << 20 | 12345, seed=3)  # odd size: a partial last block
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"\xff" * len(content))
    sock = f"{sockdir}/s"
    with serve(f"{src}=src", f"{dst}=dst", sock=sock):
        out = tmp_path / "copy.raw"
        run("nbdcopy", uri(sock, "src"), str(out))  # multi-conn, parallel requests
        assert out.read_bytes() == content
        run("nbdcopy", uri(sock, "src"), uri(sock, "dst"))  # server to server
    assert dst.read_bytes() == content


@pytest.mark.skipif(bool(need("qemu-io", "nbdinfo")), reason=str(need("qemu-io", "nbdinfo")))
def test_read_only(tmp_path: Path, sockdir: str) -> None:
    img = tmp_path / "ro.raw"
    content = make_file(img, 1 << 20)
    sock = f"{sockdir}/s"
    with serve("--read-only", "--socket-mode", "0660", f"{img}=ro", sock=sock):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        p = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri(sock, "ro"), ok=False)
        assert "permission denied" in (p.stdout + p.stderr).lower() or p.returncode != 0
        with Client(sock).connect("ro") as c:
            assert c.flags & w.FLAG_READ_ONLY
            assert c.command(w.CMD_WRITE, 0, 3, data=b"abc").error == w.EPERM
            assert c.read(0, 4096) == content[:4096]
    assert img.read_bytes() == content


@pytest.mark.skipif(bool(need("nbdinfo")), reason=str(need("nbdinfo")))
def test_tcp_listen(tmp_path: Path, sockdir: str) -> None:
    make_file(tmp_path / "t.raw", 1 << 20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serve("--listen", f"127.0.0.1:{port}", f"{tmp_path / 't.raw'}=t",
               sock=f"{sockdir}/s"):
        p = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/t")
        assert p.stdout.strip() == str(1 << 20)


def _make_cert(d: str) -> None:
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=localhost", "-keyout", f"{d}/server-key.pem",
        "-out", f"{d}/server-cert.pem")
    shutil.copy(f"{d}/server-cert.pem", f"{d}/ca-cert.pem")


@pytest.mark.skipif(bool(need("nbdinfo", "openssl")), reason=str(need("nbdinfo", "openssl")))
def test_tls_required(tmp_path: Path, sockdir: str) -> None:
    img = tmp_path / "t.raw"
    make_file(img, 1 << 20)
    certs = str(tmp_path)
    _make_cert(certs)
    sock = f"{sockdir}/s"
    with serve("--tls-cert", f"{certs}/server-cert.pem", "--tls-key",
               f"{certs}/server-key.pem", "--tls-required", f"{img}=t", sock=sock):
        plain = run("nbdinfo", "--size", uri(sock, "t"), ok=False)
        assert plain.returncode != 0
        tls_uri = (f"nbds+unix:///t?socket={sock}&tls-certificates={certs}"
                   "&tls-verify-peer=false")
        assert run("nbdinfo", "--size", tls_uri).stdout.strip() == str(1 << 20)
        if not need("nbdcopy"):
            out = tmp_path / "copy.raw"
            run("nbdcopy", tls_uri, str(out))
            assert out.read_bytes() == img.read_bytes()


@pytest.mark.skipif(bool(need("nbdinfo", "openssl")), reason=str(need("nbdinfo", "openssl")))
def test_tls_client_certificates(tmp_path: Path, sockdir: str) -> None:
    img = tmp_path / "t.raw"
    make_file(img, 1 << 20)
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_cert(str(certs))
    anonymous = tmp_path / "anon"  # trusts the server but has no client certificate
    anonymous.mkdir()
    shutil.copy(certs / "ca-cert.pem", anonymous / "ca-cert.pem")
    # The self-signed certificate doubles as the CA and the client's certificate.
    shutil.copy(certs / "server-cert.pem", certs / "client-cert.pem")
    shutil.copy(certs / "server-key.pem", certs / "client-key.pem")
    sock = f"{sockdir}/s"
    with serve("--tls-cert", str(certs / "server-cert.pem"), "--tls-key",
               str(certs / "server-key.pem"), "--tls-ca", str(certs / "ca-cert.pem"),
               f"{img}=t", sock=sock):
        def tls_uri(d: Path) -> str:
            return f"nbds+unix:///t?socket={sock}&tls-certificates={d}&tls-verify-peer=false"
        assert run("nbdinfo", "--size", tls_uri(certs)).stdout.strip() == str(1 << 20)
        assert run("nbdinfo", "--size", tls_uri(anonymous), ok=False).returncode != 0
        # Without --tls-required, plain connections are still served.
        assert run("nbdinfo", "--size", uri(sock, "t")).stdout.strip() == str(1 << 20)


def test_sigterm_exits_zero_and_removes_socket(tmp_path: Path, sockdir: str) -> None:
    make_file(tmp_path / "d.raw", 1 << 20)
    sock = f"{sockdir}/s"
    with serve(f"{tmp_path / 'd.raw'}=d", sock=sock) as proc:
        c = Client(sock).connect("d")
        c.write(0, b"persist me")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        c.sock.close()
    assert not os.path.exists(sock)
    assert (tmp_path / "d.raw").read_bytes()[:10] == b"persist me"


# --- in-process behaviour -------------------------------------------------------------------
def test_replies_out_of_order_and_concurrent(inproc: Callable[..., InProcess]) -> None:
    slow, fast = MemLayer(1 << 20, delay=0.3), MemLayer(1 << 20)
    srv: InProcess = inproc({"slow": slow, "fast": fast})
    with Client(srv.path).connect("slow") as c:
        c.write(0, b"a" * 100)
        start = time.monotonic()
        # Eight slow reads, then a write: the write's reply overtakes them.
        for h in range(10, 18):
            c.send(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_READ, h, 0, 100))
        c.send(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 99, 200, 1) + b"z")
        first = c.reply()
        assert first.handle == 99 and first.error == 0
        handles = {c.reply(100).handle for _ in range(8)}
        assert handles == set(range(10, 18))
        assert time.monotonic() - start < 1.5  # concurrent, not 8 x 0.3 s


def test_cache_flush_and_block_status_reach_layer(inproc: Callable[..., InProcess]) -> None:
    layer = MemLayer(1 << 20)
    srv: InProcess = inproc({"m": layer})
    with Client(srv.path).connect("m", contexts=("base:allocation",
                                                 "qemu:allocation-depth")) as c:
        assert c.command(w.CMD_CACHE, 4096, 8192).error == 0
        assert c.command(w.CMD_FLUSH).error == 0
        c.write(0, b"q" * 10)
        r = c.command(w.CMD_BLOCK_STATUS, 0, 1 << 20, flags=w.CMD_FLAG_REQ_ONE)
        assert r.error == 0 and len(r.chunks) == 2
        by_id = {w.U32.unpack_from(p)[0]: p[4:] for _, _, p in r.chunks}
        assert {c.contexts[i] for i in by_id} == {"base:allocation", "qemu:allocation-depth"}
        for ctx_id, payload in by_id.items():
            assert len(payload) == 8  # REQ_ONE: a single descriptor
            length, flags = w.BLOCK_DESCRIPTOR.unpack(payload)
            assert length == 64 << 10
            assert flags == (1 if c.contexts[ctx_id] == "qemu:allocation-depth" else 0)
    assert layer.prefetched == [(4096, 8192)] and layer.flushes >= 1


def test_shutdown_finishes_inflight_then_closes(inproc: Callable[..., InProcess]) -> None:
    layer = MemLayer(1 << 20, delay=0.5)
    srv: InProcess = inproc({"m": layer})
    c = Client(srv.path).connect("m")
    c.send(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_READ, 7, 0, 4096))
    time.sleep(0.1)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    r = c.reply(4096)
    assert r.handle == 7 and r.error == 0 and r.data == bytes(4096)
    with pytest.raises((ConnectionError, OSError)):
        c.command(w.CMD_READ, 0, 1)  # ESHUTDOWN reply or closed: not served
        c.command(w.CMD_READ, 0, 1)
        c.recv_exact(1)
    stopper.join(30)
    assert layer.closed and layer.flushes >= 1
    c.sock.close()


class TaskOnlyLayer(MemLayer):
    """A layer whose first step needs a Task (asyncio.timeout, like aiohttp)."""

    async def pread(self, offset: int, length: int) -> bytes:
        async with asyncio.timeout(5):
            return await super().pread(offset, length)


def test_layer_needing_a_task_is_served(inproc: Callable[..., InProcess]) -> None:
    layer = TaskOnlyLayer(1 << 20)
    srv: InProcess = inproc({"t": layer})
    with Client(srv.path).connect("t") as c:
        c.write(0, b"hello")
        assert c.read(0, 5) == b"hello"  # served in a Task
        assert c.read(1, 4) == b"ello"


class NowaitLayer(MemLayer):
    """Serves reads of the first 64 KiB without waiting, fails those of the
    second with EIO, and leaves the rest to pread (counting each path)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.nowait = 0
        self.waited = 0

    def pread_nowait(self, offset: int, length: int) -> bytes | None:
        if offset + length <= 65536:
            self.nowait += 1
            return bytes(self.data[offset:offset + length])
        if offset < 131072:
            raise OSError(errno.EIO, "bad sector")
        return None

    async def pread(self, offset: int, length: int) -> bytes:
        self.waited += 1
        await asyncio.sleep(0)  # really waits: must run in a Task
        return await super().pread(offset, length)


def test_reads_served_without_waiting(inproc: Callable[..., InProcess]) -> None:
    """pread_nowait() answers what it can, its errors become error replies,
    and None hands the read to pread(); replies carry the right bytes."""
    layer = NowaitLayer(1 << 20)
    layer.data[:] = os.urandom(1 << 20)
    srv: InProcess = inproc({"n": layer})
    with Client(srv.path).connect("n") as c:
        assert c.read(4096, 8192) == bytes(layer.data[4096:12288])
        assert (layer.nowait, layer.waited) == (1, 0)
        assert c.read(200000, 70000) == bytes(layer.data[200000:270000])
        assert (layer.nowait, layer.waited) == (1, 1)
        c.send(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_READ, 9, 70000, 4096))
        r = c.reply(4096)
        assert r.handle == 9 and r.error == w.EIO
        assert c.read(0, 65536) == bytes(layer.data[:65536])  # the connection goes on
        assert layer.nowait == 2


def _chain_available() -> bool:
    try:
        from bootcache.layers import chain
    except ImportError:
        return False
    return hasattr(chain, "open_layer")


@pytest.mark.skipif(not _chain_available(), reason="qcow2 engine (layers.chain) not present")
@pytest.mark.skipif(bool(need("qemu-img", "qemu-io")), reason=str(need("qemu-img", "qemu-io")))
def test_serves_qcow2_through_chain_opener(tmp_path: Path, sockdir: str) -> None:
    base = tmp_path / "base.raw"
    make_file(base, 4 << 20, seed=5)
    img = tmp_path / "vm.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", str(base), str(img))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 64k 64k", str(img))
    sock = f"{sockdir}/s"
    with serve("--read-only", str(img), sock=sock):  # exported as "vm"
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri(sock, "vm"), str(img))
        if not need("nbdinfo"):
            info = json.loads(run("nbdinfo", "--json", uri(sock, "vm")).stdout)
            assert info["exports"][0]["export-size"] == 4 << 20


def test_unfinished_handshake_times_out(inproc: Callable[..., InProcess]) -> None:
    srv: InProcess = inproc({"m": MemLayer(4096)}, handshake_timeout=0.5)
    idle = socket.socket(socket.AF_UNIX)
    idle.settimeout(5)
    idle.connect(srv.path)
    assert len(idle.recv(18)) == 18
    assert idle.recv(1) == b""  # closed after the timeout
    idle.close()
    with Client(srv.path).connect("m") as c:  # finished handshakes are not affected
        time.sleep(0.8)
        assert c.read(0, 8) == bytes(8)


def test_bootcache_client_reads_bootcache_server(tmp_path: Path, sockdir: str) -> None:
    """The project's own NBD client (sources) against this server, multi-conn."""
    client = pytest.importorskip("bootcache.nbd.client", reason="NBD client not present")
    img = tmp_path / "c.raw"
    content = make_file(img, 8 << 20, seed=11)
    sock = f"{sockdir}/s"

    async def go() -> None:
        src = await client.NbdSource.open(uri(sock, "c"), connections=4)
        try:
            assert await src.size() == len(content)
            offsets = [i * 77777 for i in range(100)]
            got = await asyncio.gather(*(src.pread(o, 65536) for o in offsets))
            assert all(g == content[o:o + 65536] for g, o in zip(got, offsets, strict=True))
            assert await src.pread(len(content) - 10, 10) == content[-10:]
        finally:
            await src.close()

    with serve("--read-only", f"{img}=c", sock=sock):
        asyncio.run(go())


@pytest.mark.skipif(not _chain_available(), reason="qcow2 engine (layers.chain) not present")
@pytest.mark.skipif(bool(need("qemu-img", "nbdcopy")), reason=str(need("qemu-img", "nbdcopy")))
def test_serves_cache_image_read_only(tmp_path: Path, sockdir: str) -> None:
    base = tmp_path / "base.raw"
    content = make_file(base, 8 << 20, seed=13)
    cache = tmp_path / "cache.qcow2"
    p = subprocess.run([sys.executable, "-m", "bootcache", "create", "-f", "qcow2", "-b",
                        str(base), "-F", "raw", "-o", "cache_img_quota=64M", str(cache)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot create a cache image: {p.stderr.strip()}")
    sock = f"{sockdir}/s"
    with serve(str(cache), sock=sock):
        with Client(sock).connect("cache") as c:
            # Cold cache, 16 reads in one cluster at once: misses coalesce.
            c.send(b"".join(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_READ, h, (1 << 20) + h * 4096,
                                           4096) for h in range(16)))
            for _ in range(16):
                r = c.reply(4096)
                assert r.error == 0, r.message
                start = (1 << 20) + r.handle * 4096
                assert r.data == content[start:start + 4096]
            assert c.flags & w.FLAG_READ_ONLY  # a cache is never writable by clients
            assert c.command(w.CMD_WRITE, 0, 1, data=b"x").error == w.EPERM
            assert c.command(w.CMD_CACHE, 0, 1 << 20).error == 0  # prefetch
        out = tmp_path / "copy.raw"
        run("nbdcopy", uri(sock, "cache"), str(out))
        assert out.read_bytes() == content
    # The reads filled the cache: the image now holds the data itself.
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(cache), str(base))
    info = json.loads(run("qemu-img", "info", "--output=json", str(cache)).stdout)
    assert info["actual-size"] >= len(content)


class BrokenLayer(MemLayer):
    """Fails in the ways a buggy or unlucky layer can."""

    async def pread(self, offset: int, length: int) -> bytes:
        if offset == 0:
            raise OSError(5, "disk on fire")
        if offset == 512:
            raise KeyError("a bug")
        if offset == 1024:
            await asyncio.sleep(0.01)
            raise OSError(28, "full")
        return b"short"

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return None  # type: ignore[return-value]  # a bug: not a list


def test_layer_failures_fail_one_request(inproc: Callable[..., InProcess]) -> None:
    srv: InProcess = inproc({"b": BrokenLayer(1 << 20)})
    with Client(srv.path).connect("b", contexts=("base:allocation",)) as c:
        r = c.command(w.CMD_READ, 0, 16)
        assert r.error == w.EIO and "disk on fire" in r.message
        assert c.command(w.CMD_READ, 512, 16).error == w.EIO
        assert c.command(w.CMD_READ, 1024, 16).error == w.ENOSPC
        assert c.command(w.CMD_READ, 4096, 16).error == w.EIO  # short read
        assert c.command(w.CMD_BLOCK_STATUS, 0, 4096).error == w.EIO
        c.write(8192, b"fine")  # the connection is still usable


class SingleFlightLayer(MemLayer):
    """Concurrent reads wait on one shared future, as a cache's coalesced
    misses do: each request's first step yields the same future."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._flight: asyncio.Future[None] | None = None

    async def pread(self, offset: int, length: int) -> bytes:
        if self._flight is None or self._flight.done():
            loop = asyncio.get_running_loop()
            self._flight = loop.create_future()
            loop.call_later(0.05, self._flight.set_result, None)
        await self._flight
        return await super().pread(offset, length)


def test_requests_sharing_one_future(inproc: Callable[..., InProcess]) -> None:
    layer = SingleFlightLayer(1 << 20)
    layer.data[:4096] = b"s" * 4096
    srv: InProcess = inproc({"f": layer})
    with Client(srv.path).connect("f") as c:
        c.send(b"".join(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_READ, h, 0, 4096)
                        for h in range(16)))
        replies = [c.reply(4096) for _ in range(16)]
        assert sorted(r.handle for r in replies) == list(range(16))
        assert all(r.error == 0 and r.data == b"s" * 4096 for r in replies), \
            [r.message for r in replies if r.error]


class _CountingLayer(MemLayer):
    """Holds each read for a moment and records the most bytes read at once."""

    def __init__(self, size: int) -> None:
        super().__init__(size, read_only=True)
        self.now = 0
        self.most = 0

    async def pread(self, offset: int, length: int) -> bytes:
        self.now += length
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.002)
            return await super().pread(offset, length)
        finally:
            self.now -= length


def test_server_wide_inflight_budget(inproc: Callable[..., InProcess]) -> None:
    """Many clients pipelining big reads: the server holds at most its global
    budget (plus one request) in flight, and every reply is still right."""
    from nbd_testlib import request

    layer = _CountingLayer(8 << 20)
    layer.data[:] = os.urandom(len(layer.data))
    srv = inproc({"d": layer})
    assert srv.server is not None
    budget, n = 512 << 10, 128 << 10
    srv.call(lambda: setattr(srv.server, "max_inflight_bytes", budget))
    clients = [Client(srv.path).connect("d") for _ in range(4)]
    try:
        for c in clients:
            for k in range(16):
                c.send(request(w.CMD_READ, 1000 + k, k * n, n))
        for c in clients:
            for _ in range(16):
                r = c.reply(n)
                k = r.handle - 1000
                assert r.error == 0 and r.data == bytes(layer.data[k * n:(k + 1) * n])
    finally:
        for c in clients:
            c.close()
    assert n <= layer.most <= budget + n, layer.most
    assert srv.call(lambda: srv.server.inflight_bytes) == 0  # type: ignore[union-attr]


@pytest.mark.skipif(bool(need("nbdcopy", "qemu-io")), reason=str(need("nbdcopy", "qemu-io")))
def test_pipelined_small_reads_on_one_connection(tmp_path: Path, sockdir: str) -> None:
    """Many 4 KiB reads in flight on one connection, as QD16+ clients send
    them, over a half-warm cache: batches mix reads served at once (hits)
    with reads that wait for the base (misses); every byte must match."""
    base = tmp_path / "base.raw"
    content = make_file(base, 16 << 20, seed=17)
    cache = tmp_path / "cache.qcow2"
    run(sys.executable, "-m", "bootcache", "create", "-f", "qcow2", "-b", str(base), "-F", "raw",
        "-o", "cache_img_quota=64M", str(cache))
    sock = f"{sockdir}/s"
    with serve(str(cache), sock=sock):
        # Warm every other MiB (qemu-io: concurrent reads of the base's bytes).
        ops = [f"aio_read {m << 20} 1M" for m in range(0, 16, 2)] + ["aio_flush"]
        args = [a for op in ops for a in ("-c", op)]
        run("qemu-io", "-r", "-f", "raw", *args, uri(sock, "cache"))
        for _ in range(2):  # half warm, then all warm
            out = tmp_path / "copy.raw"
            run("nbdcopy", "--connections=1", "--requests=64", "--request-size=4096",
                "--no-extents", uri(sock, "cache"), str(out))
            assert out.read_bytes() == content
            out.unlink()


def test_client_sockets_take_a_whole_1m_reply(inproc: Callable[..., InProcess]) -> None:
    """A 1 MiB read's reply fits in the kernel's send buffer of the client's
    socket (the server raises it from the default at accept), and reads back whole."""
    from bootcache.nbd.server import SEND_BUFFER

    layer = MemLayer(4 << 20)
    srv: InProcess = inproc({"m": layer})
    with Client(srv.path).connect("m") as c:
        c.write(1 << 20, b"q" * (1 << 20))
        assert srv.server is not None
        server = srv.server
        sizes = srv.call(lambda: [
            conn.transport.get_extra_info("socket").getsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF)
            for conn in server.connections])
        wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
        # Linux reports twice what was set (its bookkeeping), capped by wmem_max.
        assert sizes and all(size >= min(SEND_BUFFER, wmem_max) for size in sizes), sizes
        assert c.read(1 << 20, 1 << 20) == b"q" * (1 << 20)
