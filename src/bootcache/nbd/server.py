"""The asyncio NBD server: a thin transport around the sans-I/O protocol.

One :class:`NBDServer` serves the exports of a :class:`Catalogue` on UNIX
and/or TCP sockets. The server owns sockets and connections only: the
catalogue says which exports exist right now (it may change while clients
are connected) and owns their layers. Each connection is an ``asyncio.Protocol``: bytes
go into a :class:`~bootcache.nbd.protocol.ServerConnection`, requests come
out and run against the export's layer concurrently; replies may leave out
of order.

Hot path notes:
- A read first asks the layer's ``pread_nowait()``: a read it can serve
  from the page cache (a cache hit, a local file) completes right there,
  without a coroutine or an asyncio Task (a Task costs several microseconds,
  more than the read). Every other request runs in a Task.
- Replies produced while one ``data_received`` batch is parsed are written
  with one ``writelines`` call, i.e. one syscall per batch, not per request.
- Plain reads are taken off the input in runs (``take_reads``: unpacked
  headers, no event object each) and served in one loop with one look at
  the chain's versions per run.
- Each client socket's kernel send buffer holds a whole 1 MiB reply
  (SEND_BUFFER), so a large read leaves in one ``writev``.
- Memory is bounded: reading from the socket pauses while the transport's
  write buffer is above its high-water mark (slow reader), while too many
  requests or bytes are in flight, and the protocol caps write payloads.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, cast

from bootcache.block.layer import BlockLayer, chain_of
from bootcache.errors import BootcacheError, ReadOnlyError
from bootcache.nbd import wire as w
from bootcache.nbd.protocol import (
    MAX_PAYLOAD,
    NEED_DATA,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    ProtocolError,
    Ready,
    Request,
    ServerConnection,
    StartTLS,
    extent_descriptors,
)

log = logging.getLogger("bootcache.nbd")

MAX_INFLIGHT = 64  # requests per connection running at once
MAX_INFLIGHT_BYTES = 64 << 20  # read+write bytes per connection in flight
# Bytes in flight over all connections: 64 VMs each at their own limit would
# otherwise hold 4 GiB of buffers.
MAX_SERVER_INFLIGHT_BYTES = 512 << 20
WRITE_HIGH_WATER = 4 << 20  # transport buffer: stop reading requests above
WRITE_LOW_WATER = 1 << 20
BATCH_FLUSH = 1 << 20  # write a batch out early once it holds this much
# The kernel's send buffer of each client socket (the default, about 200 KiB,
# makes a 1 MiB reply leave in five writes, each a wake-up of the loop; a
# buffer that holds it whole served 1 MiB reads 1.4-1.5x faster,
# BENCHMARKS.md). Capped by net.core.wmem_max; memory is only used when the
# client reads slower than the server writes.
SEND_BUFFER = 2 << 20


#: Upper bounds (seconds) of the read-latency histogram's buckets.
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class ReadCounters:
    """Reads served by one export, and how long they took."""

    __slots__ = ("buckets", "bytes", "errors", "reads", "seconds")

    def __init__(self) -> None:
        self.reads = 0
        self.bytes = 0
        self.errors = 0
        self.seconds = 0.0
        #: Reads per latency bucket (the last one: slower than every bound).
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def add(self, nbytes: int, seconds: float) -> None:
        self.reads += 1
        self.bytes += nbytes
        self.seconds += seconds
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1


class Export:
    """One export: its layer, what the protocol sees of it, and run mode."""

    def __init__(self, name: str, layer: BlockLayer, description: str = "", *,
                 read_only: bool = False) -> None:
        self.name = name
        self.layer = layer
        self.info = ExportInfo(size=layer.size, read_only=read_only or layer.read_only,
                               description=description,
                               fast_zero=bool(getattr(layer, "fast_zero", False)))
        self.counters = ReadCounters()


class Catalogue(Protocol):
    """What the server asks of whoever owns the exports."""

    def get(self, name: str) -> Export | None:
        """The export a new client may open under ``name`` (None: no such export)."""

    def names(self) -> list[str]:
        """Exports a client may list, in order."""

    def attach(self, export: Export, conn: NBDProtocol) -> None:
        """A client entered transmission on ``export``."""

    def detach(self, export: Export, conn: NBDProtocol) -> None:
        """That client's connection ended."""


class StaticCatalogue:
    """A fixed set of exports (for tools and tests); the caller owns the layers."""

    def __init__(self, layers: Mapping[str, BlockLayer]) -> None:
        self.exports = {name: Export(name, layer) for name, layer in layers.items()}

    def get(self, name: str) -> Export | None:
        return self.exports.get(name)

    def names(self) -> list[str]:
        return list(self.exports)

    def attach(self, export: Export, conn: NBDProtocol) -> None:
        pass

    def detach(self, export: Export, conn: NBDProtocol) -> None:
        pass


class _InfoView(Mapping[str, ExportInfo]):
    """The catalogue as the protocol core sees it: names to ExportInfo, live."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue

    def __getitem__(self, name: str) -> ExportInfo:
        export = self._catalogue.get(name)
        if export is None:
            raise KeyError(name)
        return export.info

    def __iter__(self) -> Iterator[str]:
        return iter(self._catalogue.names())

    def __len__(self) -> int:
        return len(self._catalogue.names())


def nbd_errno(exc: BaseException) -> int:
    """The NBD error for an exception raised by a layer."""
    if isinstance(exc, ReadOnlyError):
        return w.EPERM
    if isinstance(exc, ValueError):
        return w.EINVAL
    if isinstance(exc, NotImplementedError):
        return w.ENOTSUP
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return w.ENOSPC
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return w.ENOTSUP
        if exc.errno == errno.ENOMEM:
            return w.ENOMEM
    return w.EIO


Done = Callable[[Request, Any], None]


class NBDProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.conn = ServerConnection(server.infos, tls=server.ssl_context is not None,
                                     tls_required=server.tls_required,
                                     max_payload=server.max_payload)
        self.export: Export | None = None
        self.layer: BlockLayer | None = None
        #: The content versions of the export's chain when this connection's
        #: first read or write was served (None: not yet). A client sees one.
        self._pinned: list[tuple[BlockLayer, int]] | None = None
        self.peer = "?"
        self._batch: list[bytes] | None = None
        self._batch_bytes = 0
        self._tasks: dict[asyncio.Task[Any], tuple[Request, Done, float]] = {}
        #: How long the request being completed waited (0: done at once).
        self._waited = 0.0
        self._inflight_bytes = 0
        self._write_paused = False
        self._reading_paused = False
        self._hold = False  # no parsing: TLS upgrade or session ending
        self._blocked = False  # any reason to stop parsing (see _recheck)
        self._ending = False
        self._lost = False
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._handlers: dict[int, Callable[[Request], None]] = {
            w.CMD_READ: self._read, w.CMD_WRITE: self._write, w.CMD_FLUSH: self._flush,
            w.CMD_TRIM: self._trim, w.CMD_WRITE_ZEROES: self._write_zeroes,
            w.CMD_CACHE: self._cache, w.CMD_BLOCK_STATUS: self._block_status,
        }

    # --- asyncio callbacks ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; same interface.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.server.connections.add(self)
        if self.server.closing:
            self.conn.shutdown()
        # A client that never finishes the handshake must not hold a slot forever.
        self._handshake_timer = self.loop.call_later(
            self.server.handshake_timeout, self._handshake_expired)
        transport.write(self.conn.data_to_send())

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.layer is None and not self._ending:
            log.info("%s: handshake not finished in %ss, closing", self.peer,
                     self.server.handshake_timeout)
            self._abort()

    def data_received(self, data: bytes) -> None:
        if self._ending:
            return  # after DISC/ABORT or an error, input is ignored, not buffered
        try:
            self.conn.receive_data(data)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        # Keep the write side open for in-flight replies (TLS cannot half-close).
        return not self.conn.tls_active

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._lost = True
        self._ending = True
        self._check_finished()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._recheck()
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._recheck()
        self._update_reading()
        self._process()

    # --- parsing loop -------------------------------------------------------------------
    def _recheck(self) -> None:
        """Recompute whether parsing must stop (kept in one flag for the loop)."""
        self._blocked = (self._hold or self._write_paused or len(self._tasks) >= MAX_INFLIGHT
                         or self._inflight_bytes >= MAX_INFLIGHT_BYTES
                         or self.server.inflight_bytes >= self.server.max_inflight_bytes)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        want_pause = self._blocked
        if want_pause != self._reading_paused:
            self._reading_paused = want_pause
            if want_pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _process(self) -> None:
        """Handle every complete event buffered, batching the replies."""
        if self._batch is not None or self._ending:
            return  # re-entered from a write callback; the outer loop continues
        conn = self.conn
        handlers = self._handlers
        self._recheck()  # the server-wide budget may have filled since
        batch: list[bytes] = []
        self._batch = batch
        self._batch_bytes = 0
        try:
            while not self._blocked:
                reads = conn.take_reads(MAX_INFLIGHT - len(self._tasks), self._read_budget())
                if reads:
                    self._serve_reads(reads)
                    if conn.input_drained():
                        break  # the usual end of a batch: no need to ask for more
                    continue
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is Request:
                    try:
                        handlers[event.command](event)
                    except Exception as exc:  # a bug below: fail this request only
                        self._failed(event, exc)
                else:
                    self._session_event(event)
        except ProtocolError as e:
            self._batch = None
            self._write_out(batch)
            self._protocol_error(e)
            return
        except BaseException:
            self._batch = None
            self._abort()
            raise
        self._batch = None
        out = conn.data_to_send()
        if out:
            batch.append(out)
        if batch:
            self._write_out(batch)
        if self._ending:
            self._check_finished()
        elif self._blocked != self._reading_paused:
            self._update_reading()

    def _write_out(self, batch: list[bytes]) -> None:
        if batch and self.transport is not None and not self._lost:
            if len(batch) == 1:
                self.transport.write(batch[0])
            else:
                self.transport.writelines(batch)

    def _flush_batch(self) -> None:
        """Hand a big batch over now, so that flow control sees it."""
        batch = self._batch
        assert batch is not None
        self._write_out(batch)
        batch.clear()
        self._batch_bytes = 0

    def _send(self, data: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(data)
            self._batch_bytes += len(data)
            if self._batch_bytes >= BATCH_FLUSH:
                self._flush_batch()
        elif self.transport is not None and not self._lost:
            self.transport.write(data)

    def _session_event(self, event: object) -> None:
        if type(event) is Ready:
            export = self.server.catalogue.get(event.export)
            if export is None:  # removed between the lookup and now
                self._abort()
                return
            self.export = export
            self.layer = export.layer
            self.server.catalogue.attach(export, self)
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
                self._handshake_timer = None
            log.debug("%s: transmission on %r", self.peer, event.export)
        elif type(event) is StartTLS:
            self._hold = True
            self._recheck()
            self._send(self.conn.data_to_send())
            self.loop.create_task(self._start_tls())
        elif type(event) in (Disconnect, ConnectionClosed):
            self._end_session()

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.server.ssl_context is not None
        try:
            self.transport = await self.loop.start_tls(
                self.transport, self, self.server.ssl_context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as e:
            log.info("%s: TLS handshake failed: %s", self.peer, e)
            self._abort()
            return
        except Exception:
            log.exception("%s: TLS upgrade failed", self.peer)
            self._abort()
            return
        self.conn.tls_started()
        self._hold = False
        self._recheck()
        self._update_reading()
        self._process()

    def _end_session(self) -> None:
        """Stop parsing; close once every in-flight request has replied."""
        self._hold = True
        self._recheck()
        self._ending = True
        self._check_finished()

    def begin_shutdown(self) -> None:
        """Server shutdown: error new requests; close when in-flight ones finish."""
        self.conn.shutdown()
        if self.layer is None:
            self._end_session()  # still haggling: nothing to finish
        else:
            self._process()
            if not self._tasks:
                self._end_session()

    def _check_finished(self) -> None:
        if not self._ending or self._tasks or self._batch is not None:
            return  # (inside _process, which calls again when its batch is out)
        if not self._lost and self.transport is not None:
            out = self.conn.data_to_send()
            if out:
                self.transport.write(out)
            self.transport.close()
            return  # connection_lost() comes back here
        self.server.connections.discard(self)
        if self.export is not None:
            self.server.catalogue.detach(self.export, self)
            self.export = None
        if not self.finished.done():
            self.finished.set_result(None)

    def _protocol_error(self, e: ProtocolError) -> None:
        log.info("%s: protocol error, closing: %s", self.peer, e)
        self._abort()

    def budget_freed(self) -> None:
        """The server's in-flight budget has room again."""
        if self._ending or self._batch is not None:
            return  # ending, or inside _process (which rechecks as it goes)
        self._recheck()
        self._update_reading()
        if not self._blocked:
            self._process()

    def close_now(self) -> None:
        """Drop the client at once: requests in flight are cancelled."""
        for task in list(self._tasks):
            task.cancel()
        self._abort()

    def _abort(self) -> None:
        self._hold = True
        self._recheck()
        self._ending = True
        if self.transport is not None and not self._lost:
            self.transport.abort()
        self._check_finished()

    # --- running requests -----------------------------------------------------------------
    def _start(self, req: Request, done: Done, fn: Callable[..., Any], *args: Any,
               **kwargs: Any) -> None:
        """Run coroutine ``fn(*args, **kwargs)`` for ``req`` in a Task, then
        ``done(req, result)``."""
        self._track(self.loop.create_task(fn(*args, **kwargs)), req, done)

    def _track(self, task: asyncio.Task[Any], req: Request, done: Done) -> None:
        self._tasks[task] = (req, done, time.monotonic())
        if req.command <= w.CMD_WRITE:
            self._inflight_bytes += req.length
            self.server.inflight_bytes += req.length
        task.add_done_callback(self._task_done)
        self._recheck()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        req, done, started = self._tasks.pop(task)
        if req.command <= w.CMD_WRITE:
            self._inflight_bytes -= req.length
            self.server.release_budget(req.length)
        self._recheck()
        if task.cancelled():
            self._send(self.conn.reply_error(req.handle, w.ESHUTDOWN, "cancelled"))
        elif (exc := task.exception()) is not None:
            if req.command == w.CMD_READ and self.export is not None:
                self.export.counters.errors += 1
            self._failed(req, exc)
        else:
            self._waited = time.monotonic() - started
            try:
                done(req, task.result())
            except Exception as bug:
                self._failed(req, bug)
            self._waited = 0.0
        if self._ending:
            self._check_finished()
        else:
            self._update_reading()
            if not self._blocked:
                self._process()

    def _failed(self, req: Request, exc: BaseException) -> None:
        error = nbd_errno(exc)
        if not isinstance(exc, (BootcacheError, OSError, ValueError, NotImplementedError)):
            log.error("%s: %s failed", self.peer, w.name_of("command", req.command),
                      exc_info=exc)
        else:
            log.info("%s: %s at %d+%d failed: %s", self.peer,
                     w.name_of("command", req.command), req.offset, req.length, exc)
        self._send(self.conn.reply_error(req.handle, error, str(exc)))

    def _ok(self, req: Request, _result: Any) -> None:
        self._send(self.conn.reply_ok(req.handle))

    def _written(self, req: Request, _result: Any) -> None:
        if self._version_moved():  # the write may have landed over the new version
            self._refuse_moved(req)
            return
        self._pin()
        self._ok(req, _result)

    # --- one version per client -----------------------------------------------------------
    def _version_moved(self) -> bool:
        """True once the data under this connection switched to another
        version of its base since its first read or write.

        A guest that read blocks of the old base must not get blocks of the
        new one (its file system would be a mix): from then on its reads and
        writes fail with EIO, and a reconnecting client starts afresh."""
        pinned = self._pinned
        if pinned is not None:
            for lay, v in pinned:
                if lay.content_version() != v:
                    return True
        return False

    def _pin(self) -> None:
        """At the first request served: the versions this client sees from now on."""
        if self._pinned is None and self.layer is not None:
            self._pinned = [(lay, v) for lay in chain_of(self.layer)
                            if (v := lay.content_version()) is not None]

    def _refuse_moved(self, req: Request) -> None:
        if self.export is not None:
            self.export.counters.errors += 1
        self._failed(req, OSError(errno.EIO, "the base changed since this client's first "
                                  "request; reconnect to read the new version"))

    # --- commands --------------------------------------------------------------------------
    def _read_budget(self) -> int:
        """Read bytes one take of plain reads may add: what is left of the
        in-flight budgets (should every read have to wait), and no more than
        one batch's worth, so that flow control is looked at in between."""
        server = self.server
        return min(MAX_INFLIGHT_BYTES - self._inflight_bytes,
                   server.max_inflight_bytes - server.inflight_bytes, BATCH_FLUSH)

    def _serve_reads(self, reads: list[tuple[int, ...]]) -> None:
        """Plain reads (ServerConnection.take_reads): each one the layer serves
        without waiting goes straight into the batch, the others run in Tasks.
        Nothing in here awaits, so the versions of the chain cannot move
        between the requests: one look at them covers the whole batch."""
        layer, export, batch = self.layer, self.export, self._batch
        assert layer is not None and export is not None and batch is not None
        if self._version_moved():
            for r in reads:
                self._refuse_moved(Request(r[2], r[1], r[3], r[4], r[5]))
            return
        pread_nowait = layer.pread_nowait
        read_header = self.conn.read_header
        served = nbytes = 0
        for r in reads:
            handle, offset, length = r[3], r[4], r[5]
            try:
                data = pread_nowait(offset, length)
            except Exception as exc:  # the local read failed (EIO): the reply says so
                export.counters.errors += 1
                self._failed(Request(r[2], r[1], handle, offset, length), exc)
                continue
            if data is None or len(data) != length:
                req = Request(r[2], r[1], handle, offset, length)
                if data is None:
                    self._start(req, self._read_done, layer.pread, offset, length)
                else:
                    self._read_done(req, data)  # a short read: fails it
                continue
            # Header and data go out as two buffers of one writev: no copy.
            batch.append(read_header(handle, offset, length))
            batch.append(data)
            served += 1
            nbytes += length
        if served:
            if self._pinned is None:
                self._pin()
            counters = export.counters
            counters.reads += served  # done without waiting: the fastest bucket
            counters.bytes += nbytes
            counters.buckets[0] += served
            self._batch_bytes += nbytes
            if self._batch_bytes >= BATCH_FLUSH:
                self._flush_batch()

    def _read(self, req: Request) -> None:
        """A read the layer serves without waiting goes straight into the
        batch; any other runs in a Task."""
        layer, export = self.layer, self.export
        assert layer is not None and export is not None
        if self._version_moved():
            self._refuse_moved(req)
            return
        try:
            data = layer.pread_nowait(req.offset, req.length)
        except Exception as exc:  # the local read failed (EIO): the reply says so
            export.counters.errors += 1
            self._failed(req, exc)
            return
        if data is None:
            self._start(req, self._read_done, layer.pread, req.offset, req.length)
            return
        batch = self._batch
        if batch is None or len(data) != req.length:
            self._read_done(req, data)
            return
        self._pin()
        # Header and data go out as two buffers of one writev: no copy.
        batch.append(self.conn.read_header(req.handle, req.offset, req.length))
        batch.append(data)
        counters = export.counters
        counters.reads += 1  # done without waiting: the fastest bucket
        counters.bytes += req.length
        counters.buckets[0] += 1
        self._batch_bytes += req.length
        if self._batch_bytes >= BATCH_FLUSH:
            self._flush_batch()

    def _read_done(self, req: Request, data: bytes) -> None:
        if self._version_moved():  # a reset overlapped the read
            self._refuse_moved(req)
            return
        if self.export is not None:
            self.export.counters.add(req.length, self._waited)
        if len(data) != req.length:
            self._failed(req, OSError(errno.EIO, f"short read: {len(data)} of {req.length}"))
            return
        self._pin()
        # Header and data go out as two buffers of one writev: no copy.
        self._send(self.conn.read_header(req.handle, req.offset, req.length))
        self._send(data)

    def _write(self, req: Request) -> None:
        assert self.layer is not None
        if self._version_moved():
            self._refuse_moved(req)
            return
        self._start(req, self._written, self.layer.pwrite, req.offset, req.data,
                    fua=bool(req.flags & w.CMD_FLAG_FUA))

    def _flush(self, req: Request) -> None:
        assert self.layer is not None
        self._start(req, self._ok, self.layer.flush)

    def _trim(self, req: Request) -> None:
        self._start(req, self._ok, self._do_trim, req)

    async def _do_trim(self, req: Request) -> None:
        assert self.layer is not None
        await self.layer.discard(req.offset, req.length)
        if req.flags & w.CMD_FLAG_FUA:
            await self.layer.flush()

    def _write_zeroes(self, req: Request) -> None:
        assert self.layer is not None
        self._start(req, self._ok, self.layer.write_zeroes, req.offset, req.length,
                    may_unmap=not req.flags & w.CMD_FLAG_NO_HOLE,
                    fua=bool(req.flags & w.CMD_FLAG_FUA))

    def _cache(self, req: Request) -> None:
        assert self.layer is not None
        self._start(req, self._ok, self.layer.prefetch, req.offset, req.length)

    def _block_status(self, req: Request) -> None:
        assert self.layer is not None
        self._start(req, self._block_status_done, self.layer.block_status,
                    req.offset, req.length)

    def _block_status_done(self, req: Request, extents: Any) -> None:
        req_one = bool(req.flags & w.CMD_FLAG_REQ_ONE)
        chunks = [(ctx_id, extent_descriptors(extents, req.offset, req.length, name, req_one))
                  for ctx_id, name in self.conn.contexts]
        self._send(self.conn.reply_block_status(req.handle, chunks))


class NBDServer:
    """Serves a catalogue's exports (or a fixed name -> layer mapping) until
    :meth:`shutdown`. It never closes the layers: their owner does."""

    def __init__(self, exports: Catalogue | Mapping[str, BlockLayer], *,
                 ssl_context: ssl.SSLContext | None = None, tls_required: bool = False,
                 max_payload: int = MAX_PAYLOAD, handshake_timeout: float = 60.0) -> None:
        if tls_required and ssl_context is None:
            raise ValueError("TLS required but no certificate given")
        self.loop = asyncio.get_running_loop()
        if isinstance(exports, Mapping):
            if not exports:
                raise ValueError("no exports")
            exports = StaticCatalogue(exports)
        self.catalogue: Catalogue = exports
        self.infos: Mapping[str, ExportInfo] = _InfoView(exports)
        self.ssl_context = ssl_context
        self.tls_required = tls_required
        self.max_payload = max_payload
        self.handshake_timeout = handshake_timeout
        self.connections: set[NBDProtocol] = set()
        #: Read and write bytes in flight over every connection, and the cap.
        self.inflight_bytes = 0
        self.max_inflight_bytes = MAX_SERVER_INFLIGHT_BYTES
        self.closing = False
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []

    def release_budget(self, nbytes: int) -> None:
        """Requests finished: connections held back by the global budget go on."""
        was_over = self.inflight_bytes >= self.max_inflight_bytes
        self.inflight_bytes -= nbytes
        if was_over and self.inflight_bytes < self.max_inflight_bytes:
            for proto in list(self.connections):
                proto.budget_freed()

    def _factory(self) -> NBDProtocol:
        return NBDProtocol(self)

    async def listen_unix(self, path: str, mode: int = 0o600) -> None:
        """Listen on a UNIX socket created with permissions ``mode``."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The umask closes the window between bind() and chmod().
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, mode)
        server = await self.loop.create_unix_server(self._factory, sock=sock, backlog=128)
        self._servers.append(server)
        self._unix_paths.append(path)

    async def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listen on TCP; returns the bound addresses (port 0 picks one)."""
        server = await self.loop.create_server(self._factory, host or None, port,
                                               reuse_address=True, backlog=128)
        self._servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish (error new ones) and
        close connections. The layers stay open: their owner closes them."""
        self.closing = True
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for proto in list(self.connections):
            proto.begin_shutdown()
        pending = [p.finished for p in self.connections]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for proto in list(self.connections):
                if not proto.finished.done():
                    proto.close_now()
            if late:
                await asyncio.wait(late, timeout=5)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()


async def close_layers(layers: list[BlockLayer]) -> None:
    """Finish background work, flush and close each layer (errors logged):
    for owners of a fixed set of layers, after the server's shutdown."""
    for layer in layers:
        try:
            await layer.settle()  # background work (cache stores) first
            await layer.flush()  # a read-only cache export still writes itself
        except Exception:
            log.exception("%s: flush at shutdown failed", layer.name)
        try:
            await layer.close()
        except Exception:
            log.exception("%s: close at shutdown failed", layer.name)
