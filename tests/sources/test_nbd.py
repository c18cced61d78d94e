"""NBD client source against real qemu-nbd and nbdkit, with nbdkit fault filters."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from bootcache.errors import SourceError
from bootcache.layers.uri import open_source
from bootcache.nbd.client import NbdRequestError, NbdSource, parse_nbd_uri
from bootcache.sources.resilience import RemoteOptions

from .conftest import NbdkitServer, NbdServer, QemuNbdServer

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-nbd") and shutil.which("nbdkit")), reason="needs qemu-nbd and nbdkit")

FAST = RemoteOptions(timeout=1.0, connect_timeout=0.5, deadline=3.0, retries=50,
                     backoff=0.02, backoff_max=0.2)


def started(servers: list[NbdServer], server: NbdServer) -> NbdServer:
    servers.append(server)
    server.start()
    return server


def image(tmp_path: Path, size: int = 6 << 20, *, sparse: bool = False) -> tuple[Path, bytes]:
    """A raw image; ``sparse`` leaves holes between data islands."""
    path = tmp_path / "base.img"
    if sparse:
        buf = bytearray(size)
        rng = random.Random(1)
        for _ in range(20):
            off = rng.randrange(0, size - 65536) & ~4095
            buf[off:off + 65536] = os.urandom(65536)
        with open(path, "wb") as f:
            f.truncate(size)
            for off in range(0, size, 65536):
                chunk = bytes(buf[off:off + 65536])
                if chunk.strip(b"\0"):
                    f.seek(off)
                    f.write(chunk)
        data = bytes(buf)
    else:
        data = os.urandom(size)
        path.write_bytes(data)
    return path, data


async def check_ranges(src: NbdSource, data: bytes, n: int = 150) -> None:
    rng = random.Random(len(data))
    for _ in range(n):
        off = rng.randrange(len(data))
        length = rng.randrange(1, 300_000)
        want = data[off:off + length]
        assert await src.pread(off, length) == want + bytes(length - len(want))
    assert await src.pread(len(data) - 100, 100) == data[-100:]
    assert await src.pread(len(data) - 100, 300) == data[-100:] + bytes(200)
    assert await src.pread(len(data), 50) == bytes(50)
    assert await src.pread(0, len(data)) == data


def test_parse_uris() -> None:
    a = parse_nbd_uri("nbd://127.0.0.1:10810/my%20disk")
    assert (a.host, a.port, a.export, a.tls, a.socket) == ("127.0.0.1", 10810, "my disk",
                                                          False, None)
    a = parse_nbd_uri("nbds://example.com/x")
    assert (a.port, a.tls, a.tls_hostname) == (10809, True, None)
    a = parse_nbd_uri("nbd+unix:///base?socket=/run/x.sock")
    assert (a.socket, a.export, a.host) == ("/run/x.sock", "base", None)
    assert parse_nbd_uri("nbd+unix://?socket=/s").export == ""
    a = parse_nbd_uri("nbds+unix:///e?socket=/s&tls-hostname=h&tls-verify-peer=false")
    assert a.tls and a.tls_hostname == "h" and not a.tls_verify_peer
    for bad in ("nbd+unix:///x", "nbd:///x", "http://h/x"):
        with pytest.raises(ValueError):
            parse_nbd_uri(bad)


def test_qemu_nbd_tcp_multi_conn(tmp_path: Path, nbd_servers: list[NbdServer]) -> None:
    path, data = image(tmp_path)
    server = started(nbd_servers, QemuNbdServer(tmp_path / "srv", path))

    async def go() -> None:
        src = await NbdSource.open(server.uri, RemoteOptions(max_request=1 << 20),
                                   connections=4)
        try:
            assert src.info is not None and src.info.multi_conn and src.info.structured
            assert src.connection_count() == 4
            assert await src.size() == len(data)
            await check_ranges(src, data)
            # Parallel reads spread over the connections.
            offs = [random.randrange(len(data) - 65536) for _ in range(64)]
            got = await asyncio.gather(*(src.pread(o, 65536) for o in offs))
            assert all(g == data[o:o + 65536] for g, o in zip(got, offs, strict=True))
            ident = src.identity()
            assert ident["kind"] == "nbd" and ident["size"] == len(data)
            assert ident == await src.current_identity()
            assert src.stats()["errors"] == 0
        finally:
            await src.close()

    asyncio.run(go())


def test_fewer_clients_than_wanted(tmp_path: Path, nbd_servers: list[NbdServer]) -> None:
    """qemu-nbd --shared=2 advertises multi-conn but takes two clients: a pool of two."""
    path, data = image(tmp_path, 1 << 20)
    server = started(nbd_servers, QemuNbdServer(tmp_path / "srv", path, shared=2))

    async def go() -> None:
        src = await NbdSource.open(server.uri, FAST, connections=4)
        try:
            assert src.connection_count() == 2
            got = await asyncio.gather(*(src.pread(i * 4096, 4096) for i in range(64)))
            assert b"".join(got) == data[:64 * 4096]
            assert src.stats()["failures"] == 0
        finally:
            await src.close()

    asyncio.run(go())


def test_qemu_nbd_unix_sparse_holes(tmp_path: Path, nbd_servers: list[NbdServer]) -> None:
    """qemu-nbd answers reads of holes with OFFSET_HOLE chunks."""
    path, data = image(tmp_path, sparse=True)
    server = started(nbd_servers, QemuNbdServer(tmp_path / "srv", path, unix=True))

    async def go() -> None:
        src = await open_source(server.uri, connections=1)
        assert isinstance(src, NbdSource)
        try:
            await check_ranges(src, data)
        finally:
            await src.close()

    asyncio.run(go())


@pytest.mark.parametrize("extra", [("--no-sr",), ("--mask-handshake=1",)],
                         ids=["simple-replies", "no-no-zeroes"])
def test_older_server_features(extra: tuple[str, ...], tmp_path: Path,
                               nbd_servers: list[NbdServer]) -> None:
    """Simple replies (no structured replies) and servers that send the zero padding."""
    path, data = image(tmp_path, 2 << 20)
    server = started(nbd_servers, NbdkitServer(tmp_path / "srv", ["file", str(path)],
                                               extra=extra))

    async def go() -> None:
        src = await NbdSource.open(server.uri, FAST)
        try:
            assert src.info is not None
            assert src.info.structured == (extra != ("--no-sr",))
            await check_ranges(src, data, n=30)
        finally:
            await src.close()

    asyncio.run(go())


@pytest.mark.parametrize("extra", [("--oldstyle",), ("--mask-handshake=0",)])
def test_old_handshakes_are_refused(extra: tuple[str, ...], tmp_path: Path,
                                    nbd_servers: list[NbdServer]) -> None:
    path, _ = image(tmp_path, 1 << 20)
    server = started(nbd_servers, NbdkitServer(tmp_path / "srv", ["file", str(path)],
                                               extra=extra))

    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(SourceError, match="old handshake"):
            await NbdSource.open(server.uri, FAST)
        assert time.monotonic() - t0 < 1.0

    asyncio.run(go())


def test_identity_follows_content(tmp_path: Path, nbd_servers: list[NbdServer]) -> None:
    path, _ = image(tmp_path, 1 << 20)
    server = started(nbd_servers, QemuNbdServer(tmp_path / "srv", path))

    async def go() -> None:
        src = await NbdSource.open(server.uri, FAST)
        try:
            before = src.identity()
            # Change one sampled block (offset 0 is always sampled).
            with open(path, "r+b") as f:
                f.write(b"changed!")
            after = await src.current_identity()
            assert after["sample_sha256"] != before["sample_sha256"]
            assert after["size"] == before["size"]
        finally:
            await src.close()

    asyncio.run(go())


def test_unknown_export_fails_fast(tmp_path: Path, nbd_servers: list[NbdServer]) -> None:
    path, _ = image(tmp_path, 1 << 20)
    server = started(nbd_servers, QemuNbdServer(tmp_path / "srv", path))

    async def go() -> None:
        # A refusal is permanent: it must not be retried until the deadline. The
        # deadline is long so that a loaded machine cannot blur the difference.
        patient = FAST.with_overrides(deadline=30.0)
        t0 = time.monotonic()
        with pytest.raises(SourceError, match="no export named 'nope'"):
            await NbdSource.open(f"nbd://127.0.0.1:{server.port}/nope", patient)
        assert time.monotonic() - t0 < patient.deadline / 3

    asyncio.run(go())


def test_nbdkit_error_filter(tmp_path: Path, nbd_servers: list[NbdServer]) -> None:
    """Random EIOs are retried away; a persistent EIO ends in SourceError in time;
    once the fault is gone the same source reads again."""
    path, data = image(tmp_path, 2 << 20)
    some, every = tmp_path / "some-errors", tmp_path / "every-error"
    flaky = started(nbd_servers, NbdkitServer(
        tmp_path / "flaky", ["file", str(path), "error-pread=EIO", "error-pread-rate=30%",
                             f"error-pread-file={some}"], filters=("error",)))
    broken = started(nbd_servers, NbdkitServer(
        tmp_path / "broken", ["file", str(path), "error-pread=EIO", "error-pread-rate=100%",
                              f"error-pread-file={every}"], filters=("error",)))

    async def go() -> None:
        # 30% of tries fail: the deadline is generous so that only the retry
        # logic, not a loaded machine's scheduling, decides the outcome.
        src = await NbdSource.open(flaky.uri, FAST.with_overrides(
            max_request=256 << 10, timeout=5.0, deadline=30.0))
        try:
            some.touch()  # 30% of reads fail from now on
            await check_ranges(src, data, n=60)
            stats = src.stats()
            assert stats["retries"] > 0 and stats["failures"] == 0
        finally:
            await src.close()

        src = await NbdSource.open(broken.uri, FAST)
        try:
            every.touch()
            t0 = time.monotonic()
            with pytest.raises(SourceError, match="EIO") as e:
                await src.pread(0, 4096)
            assert time.monotonic() - t0 < FAST.deadline + 2.0
            # The server's errno stays reachable for an NBD server above us.
            assert isinstance(e.value.__cause__, NbdRequestError)
            assert e.value.__cause__.errno == 5
            every.unlink()
            assert await src.pread(0, 4096) == data[:4096]
        finally:
            await src.close()

    asyncio.run(go())


def test_nbdkit_delay_filter(tmp_path: Path, nbd_servers: list[NbdServer]) -> None:
    """Latency within the timeout is just slower; beyond it, a clean error in time."""
    path, data = image(tmp_path, 1 << 20)
    server = started(nbd_servers, NbdkitServer(
        tmp_path / "srv", ["file", str(path), "delay-read=300ms"], filters=("delay",)))

    async def go() -> None:
        src = await NbdSource.open(server.uri, FAST)
        try:
            t0 = time.monotonic()
            got = await asyncio.gather(*(src.pread(i * 8192, 8192) for i in range(16)))
            assert b"".join(got) == data[:16 * 8192]
            # nbdkit serves the connections' requests in parallel threads.
            assert time.monotonic() - t0 < 16 * 0.3
            assert src.stats()["latency_max_s"] >= 0.3
        finally:
            await src.close()

    asyncio.run(go())


def wait_stopped(pid: int) -> None:
    """SIGSTOP lands asynchronously: wait until every thread is stopped."""
    end = time.monotonic() + 5
    while time.monotonic() < end:
        states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in os.listdir(f"/proc/{pid}/task")]
        if all(st in "tT" for st in states):
            return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} did not stop")


def test_hung_server_times_out_then_recovers(tmp_path: Path,
                                             nbd_servers: list[NbdServer]) -> None:
    """A server that stops answering (SIGSTOP) costs at most the deadline."""
    path, data = image(tmp_path, 1 << 20)
    server = started(nbd_servers, NbdkitServer(tmp_path / "srv", ["file", str(path)]))
    assert server.proc is not None
    pid = server.proc.pid

    async def go() -> None:
        src = await NbdSource.open(server.uri, FAST)
        try:
            os.kill(pid, signal.SIGSTOP)
            wait_stopped(pid)
            try:
                t0 = time.monotonic()
                with pytest.raises(SourceError, match="timed out"):
                    await src.pread(0, 4096)
                assert FAST.deadline - 0.5 < time.monotonic() - t0 < FAST.deadline + 0.5
            finally:
                os.kill(pid, signal.SIGCONT)
            # The stalled connection is replaced; reads work again.
            assert await src.pread(4096, 4096) == data[4096:8192]
        finally:
            await src.close()

    asyncio.run(go())


def test_server_stopped_mid_read_then_restarted(tmp_path: Path,
                                                nbd_servers: list[NbdServer]) -> None:
    path, data = image(tmp_path, 4 << 20)
    server = started(nbd_servers, NbdkitServer(
        tmp_path / "srv", ["file", str(path), "delay-read=400ms"], filters=("delay",)))

    async def go() -> None:
        src = await NbdSource.open(server.uri, FAST)
        try:
            reads = [asyncio.create_task(src.pread(i << 20, 1 << 20)) for i in range(4)]
            await asyncio.sleep(0.1)  # the requests are inside nbdkit's delay now
            t0 = time.monotonic()
            await asyncio.to_thread(server.stop, signal.SIGKILL)
            for r in reads:
                with pytest.raises(SourceError):
                    await r
            assert time.monotonic() - t0 < FAST.deadline + 2.0
            # Down: later reads fail within the deadline too.
            t0 = time.monotonic()
            with pytest.raises(SourceError, match="attempt"):
                await src.pread(0, 4096)
            assert time.monotonic() - t0 < FAST.deadline + 2.0
            # Back: the same source reconnects by itself.
            await asyncio.to_thread(server.start)
            assert await src.pread(3 << 20, 1 << 20) == data[3 << 20:]
            assert src.stats()["failures"] == 5
        finally:
            await src.close()

    asyncio.run(go())


def test_restart_during_read_is_invisible(tmp_path: Path,
                                          nbd_servers: list[NbdServer]) -> None:
    """A short outage inside the deadline costs retries, not errors."""
    path, data = image(tmp_path, 2 << 20)
    server = started(nbd_servers, QemuNbdServer(tmp_path / "srv", path, unix=True))

    async def go() -> None:
        src = await NbdSource.open(server.uri, FAST.with_overrides(deadline=10.0))

        async def bounce() -> None:
            await asyncio.to_thread(server.stop, signal.SIGKILL)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(server.start)

        try:
            bouncer = asyncio.create_task(bounce())
            for _ in range(30):
                off = random.randrange(len(data) - 65536)
                assert await src.pread(off, 65536) == data[off:off + 65536]
                await asyncio.sleep(0.03)
            await bouncer
            assert src.stats()["failures"] == 0
        finally:
            await src.close()

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_tls(kind: str, tmp_path: Path, tls_dir: Path, nbd_servers: list[NbdServer]) -> None:
    path, data = image(tmp_path, 1 << 20)
    if kind == "nbdkit":
        server: NbdServer = NbdkitServer(tmp_path / "srv", ["file", str(path)], tls_dir=tls_dir)
    else:
        server = QemuNbdServer(tmp_path / "srv", path, tls_dir=tls_dir)
    started(nbd_servers, server)
    assert server.uri.startswith("nbds://")

    async def go() -> None:
        src = await NbdSource.open(server.uri, FAST, ca_file=str(tls_dir / "ca-cert.pem"),
                                   cert_file=str(tls_dir / "client-cert.pem"),
                                   key_file=str(tls_dir / "client-key.pem"))
        try:
            assert await src.pread(1000, 5000) == data[1000:6000]
        finally:
            await src.close()
        # The libnbd spelling: a certificates directory in the URI.
        src = await open_source(f"{server.uri}?tls-certificates={tls_dir}", timeout=1,
                                deadline=3)
        await src.close()
        # Without the CA the server's certificate is refused, at once.
        with pytest.raises(SourceError, match="TLS"):
            await NbdSource.open(server.uri, FAST)
        # Plain NBD to a TLS-only server: told why.
        with pytest.raises(SourceError, match="TLS"):
            await NbdSource.open(server.uri.replace("nbds://", "nbd://"), FAST)

    asyncio.run(go())
