"""Sans-I/O tests of the NBD server state machine: client bytes in, events
and reply bytes out, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nbd_testlib import (
    Reply,
    client_flags,
    go_data,
    meta_data,
    option,
    parse_option_replies,
    parse_replies,
    request,
)

from bootcache.block.layer import Extent
from bootcache.nbd import wire as w
from bootcache.nbd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Disconnect,
    Event,
    ExportInfo,
    ProtocolError,
    Ready,
    Request,
    ServerConnection,
    StartTLS,
    extent_descriptors,
)

SIZE = 1 << 20
EXPORTS = {
    "disk": ExportInfo(size=SIZE, read_only=False),
    "ro": ExportInfo(size=8192, read_only=True, description="read-only disk"),
    "fast": ExportInfo(size=SIZE, read_only=False, fast_zero=True),
}


def drain(conn: ServerConnection) -> list[Event]:
    events: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        assert not isinstance(ev, type(NEED_DATA))
        events.append(ev)


def new_conn(**kw: Any) -> ServerConnection:
    conn = ServerConnection(EXPORTS, **kw)
    magic, opt, flags = w.GREETING.unpack(conn.data_to_send())
    assert (magic, opt) == (w.NBDMAGIC, w.IHAVEOPT)
    assert flags == w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES
    return conn


def go(name: str = "disk", structured: bool = True,
       contexts: tuple[str, ...] = ()) -> tuple[ServerConnection, Ready]:
    conn = new_conn()
    data = client_flags()
    if structured:
        data += option(w.OPT_STRUCTURED_REPLY)
    if contexts:
        data += option(w.OPT_SET_META_CONTEXT, meta_data(name, list(contexts)))
    conn.receive_data(data + option(w.OPT_GO, go_data(name)))
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], Ready)
    replies, rest = parse_option_replies(conn.data_to_send())
    assert not rest and replies[-1].reply == w.REP_ACK
    return conn, events[0]


def replies_of(conn: ServerConnection, reads: dict[int, int] | None = None) -> list[Reply]:
    replies, rest = parse_replies(conn.data_to_send(), reads or {})
    assert not rest
    return replies


# --- handshake and options ---------------------------------------------------------------
def test_go_negotiates_export_info_and_block_size() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.OPT_GO, go_data("ro", (w.INFO_NAME,
                                                                       w.INFO_DESCRIPTION))))
    (ev,) = drain(conn)
    assert isinstance(ev, Ready) and ev.export == "ro" and not ev.structured
    replies, _ = parse_option_replies(conn.data_to_send())
    infos = {w.U16.unpack_from(r.data)[0]: r.data for r in replies if r.reply == w.REP_INFO}
    _, size, flags = w.INFO_EXPORT_PAYLOAD.unpack(infos[w.INFO_EXPORT])
    assert size == 8192
    assert flags & w.FLAG_READ_ONLY and flags & w.FLAG_CAN_MULTI_CONN
    assert not flags & (w.FLAG_SEND_TRIM | w.FLAG_SEND_WRITE_ZEROES | w.FLAG_SEND_DF)
    assert infos[w.INFO_NAME][2:] == b"ro"
    assert infos[w.INFO_DESCRIPTION][2:] == b"read-only disk"
    _, minimum, preferred, maximum = w.INFO_BLOCK_SIZE_PAYLOAD.unpack(infos[w.INFO_BLOCK_SIZE])
    assert (minimum, preferred, maximum) == (1, 4096, 32 << 20)
    assert replies[-1].reply == w.REP_ACK


def test_writable_structured_export_flags() -> None:
    _, ready = go("disk")
    assert ready.structured and ready.info.size == SIZE
    want = (w.FLAG_HAS_FLAGS | w.FLAG_SEND_FLUSH | w.FLAG_SEND_FUA | w.FLAG_SEND_TRIM
            | w.FLAG_SEND_WRITE_ZEROES | w.FLAG_SEND_FAST_ZERO | w.FLAG_SEND_CACHE
            | w.FLAG_CAN_MULTI_CONN | w.FLAG_SEND_DF)
    conn2 = new_conn()
    conn2.receive_data(client_flags() + option(w.OPT_STRUCTURED_REPLY)
                       + option(w.OPT_INFO, go_data("disk")))
    assert drain(conn2) == []  # INFO does not end haggling
    replies, _ = parse_option_replies(conn2.data_to_send())
    info = next(r for r in replies if r.reply == w.REP_INFO
                and w.U16.unpack_from(r.data)[0] == w.INFO_EXPORT)
    assert w.INFO_EXPORT_PAYLOAD.unpack(info.data)[2] == want


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    conn = new_conn()
    flags = w.FLAG_C_FIXED_NEWSTYLE | (w.FLAG_C_NO_ZEROES if no_zeroes else 0)
    conn.receive_data(client_flags(flags) + option(w.OPT_EXPORT_NAME, b"disk"))
    (ev,) = drain(conn)
    assert isinstance(ev, Ready)
    out = conn.data_to_send()
    assert len(out) == (10 if no_zeroes else 134)
    size, _ = w.EXPORT_NAME_REPLY.unpack_from(out)
    assert size == SIZE


def test_empty_name_selects_first_export() -> None:
    _, ready = go("")
    assert ready.export == "disk"


def test_export_name_unknown_closes() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.OPT_EXPORT_NAME, b"nope"))
    with pytest.raises(ProtocolError):
        drain(conn)
    with pytest.raises(ProtocolError):  # stays failed
        conn.next_event()


def test_list_abort_and_errors() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.OPT_LIST) + option(w.OPT_LIST, b"x")
                      + option(w.OPT_GO, go_data("nope")) + option(99, b"junk")
                      + option(w.OPT_GO, b"\0\0") + option(w.OPT_EXTENDED_HEADERS)
                      + option(w.OPT_ABORT))
    assert drain(conn) == [Disconnect()]
    replies, _ = parse_option_replies(conn.data_to_send())
    names = [r.data[4:].decode() for r in replies if r.reply == w.REP_SERVER]
    assert names == ["disk", "ro", "fast"]
    assert [r.reply for r in replies[3:]] == [
        w.REP_ACK, w.REP_ERR_INVALID, w.REP_ERR_UNKNOWN, w.REP_ERR_UNSUP,
        w.REP_ERR_INVALID, w.REP_ERR_UNSUP, w.REP_ACK]


def test_meta_contexts() -> None:
    conn = new_conn()
    conn.receive_data(
        client_flags()
        + option(w.OPT_SET_META_CONTEXT, meta_data("disk", ["base:allocation"]))
        + option(w.OPT_STRUCTURED_REPLY)
        + option(w.OPT_LIST_META_CONTEXT, meta_data("disk", []))
        + option(w.OPT_LIST_META_CONTEXT, meta_data("disk", ["qemu:"]))
        + option(w.OPT_SET_META_CONTEXT, meta_data("disk", ["base:allocation", "x-y:z",
                                                             "qemu:allocation-depth"]))
        + option(w.OPT_SET_META_CONTEXT, b"\0\0\0\xff")
        + option(w.OPT_SET_META_CONTEXT, meta_data("disk", ["base:allocation"]))
        + option(w.OPT_GO, go_data("disk")))
    (ready,) = drain(conn)
    replies, _ = parse_option_replies(conn.data_to_send())
    kinds = [(r.option, r.reply, r.data[4:].decode() if r.reply == w.REP_META_CONTEXT else "")
             for r in replies if r.option in (w.OPT_SET_META_CONTEXT,
                                              w.OPT_LIST_META_CONTEXT)]
    set_, list_ = w.OPT_SET_META_CONTEXT, w.OPT_LIST_META_CONTEXT
    ctx = w.REP_META_CONTEXT
    assert kinds == [
        (set_, w.REP_ERR_INVALID, ""),  # before structured replies
        (list_, ctx, "base:allocation"), (list_, ctx, "qemu:allocation-depth"),
        (list_, w.REP_ACK, ""),
        (list_, ctx, "qemu:allocation-depth"), (list_, w.REP_ACK, ""),
        (set_, ctx, "base:allocation"), (set_, ctx, "qemu:allocation-depth"),
        (set_, w.REP_ACK, ""),
        (set_, w.REP_ERR_INVALID, ""),
        (set_, ctx, "base:allocation"), (set_, w.REP_ACK, ""),
    ]
    assert isinstance(ready, Ready) and ready.contexts == ((1, "base:allocation"),)


def test_contexts_for_another_export_are_dropped() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.OPT_STRUCTURED_REPLY)
                      + option(w.OPT_SET_META_CONTEXT, meta_data("ro", ["base:allocation"]))
                      + option(w.OPT_GO, go_data("disk")))
    (ready,) = drain(conn)
    assert isinstance(ready, Ready) and ready.contexts == ()


def test_starttls() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.OPT_STARTTLS))
    assert drain(conn) == []
    (r,), _ = parse_option_replies(conn.data_to_send())
    assert r.reply == w.REP_ERR_POLICY  # no certificate configured

    conn = new_conn(tls=True, tls_required=True)
    conn.receive_data(client_flags() + option(w.OPT_LIST) + option(w.OPT_STRUCTURED_REPLY)
                      + option(w.OPT_STARTTLS))
    assert drain(conn) == [StartTLS()]
    replies, _ = parse_option_replies(conn.data_to_send())
    assert [r.reply for r in replies] == [w.REP_ERR_TLS_REQD, w.REP_ERR_TLS_REQD, w.REP_ACK]
    conn.tls_started()
    conn.receive_data(option(w.OPT_STARTTLS) + option(w.OPT_GO, go_data("disk")))
    (ready,) = drain(conn)
    assert isinstance(ready, Ready) and not ready.structured
    replies, _ = parse_option_replies(conn.data_to_send())
    assert replies[0].reply == w.REP_ERR_INVALID  # TLS already on


def test_tls_required_export_name_closes() -> None:
    conn = new_conn(tls=True, tls_required=True)
    conn.receive_data(client_flags() + option(w.OPT_EXPORT_NAME, b"disk"))
    with pytest.raises(ProtocolError):
        drain(conn)


def test_data_before_tls_handshake_is_fatal() -> None:
    conn = new_conn(tls=True)
    conn.receive_data(client_flags() + option(w.OPT_STARTTLS) + b"early")
    with pytest.raises(ProtocolError):
        drain(conn)


def test_bad_client_flags_and_option_magic() -> None:
    conn = new_conn()
    conn.receive_data(client_flags(0x80))
    with pytest.raises(ProtocolError):
        drain(conn)
    conn = new_conn()
    conn.receive_data(client_flags() + b"\0" * 16)
    with pytest.raises(ProtocolError):
        drain(conn)


def test_oversized_option_is_skipped_not_buffered() -> None:
    conn = new_conn(max_option=1024)
    conn.receive_data(client_flags() + w.OPTION_HEADER.pack(w.IHAVEOPT, w.OPT_LIST, 10 << 20))
    for _ in range(10):
        conn.receive_data(bytes(1 << 20))
        assert drain(conn) == []
        assert len(conn._buf) < 4096
    conn.receive_data(option(w.OPT_GO, go_data("disk")))
    (ready,) = drain(conn)
    assert isinstance(ready, Ready)
    replies, _ = parse_option_replies(conn.data_to_send())
    assert replies[0].reply == w.REP_ERR_TOO_BIG and replies[-1].reply == w.REP_ACK


def test_shutdown_refuses_options() -> None:
    conn = new_conn()
    conn.shutdown()
    conn.receive_data(client_flags() + option(w.OPT_LIST) + option(w.OPT_ABORT))
    assert drain(conn) == [Disconnect()]
    replies, _ = parse_option_replies(conn.data_to_send())
    assert [r.reply for r in replies] == [w.REP_ERR_SHUTDOWN, w.REP_ACK]


# --- transmission -------------------------------------------------------------------------
def test_requests_become_events() -> None:
    conn, _ = go("disk")
    conn.receive_data(request(w.CMD_READ, 1, 4096, 512)
                      + request(w.CMD_WRITE, 2, 0, flags=w.CMD_FLAG_FUA, data=b"abc")
                      + request(w.CMD_FLUSH, 3)
                      + request(w.CMD_TRIM, 4, 0, 4096)
                      + request(w.CMD_WRITE_ZEROES, 5, 0, 4096, flags=w.CMD_FLAG_NO_HOLE)
                      + request(w.CMD_CACHE, 6, 0, SIZE)
                      + request(w.CMD_DISC, 7))
    assert drain(conn) == [
        Request(w.CMD_READ, 0, 1, 4096, 512),
        Request(w.CMD_WRITE, w.CMD_FLAG_FUA, 2, 0, 3, b"abc"),
        Request(w.CMD_FLUSH, 0, 3, 0, 0),
        Request(w.CMD_TRIM, 0, 4, 0, 4096),
        Request(w.CMD_WRITE_ZEROES, w.CMD_FLAG_NO_HOLE, 5, 0, 4096),
        Request(w.CMD_CACHE, 0, 6, 0, SIZE),
        Disconnect(),
    ]
    assert conn.data_to_send() == b""
    conn.receive_data(request(w.CMD_READ, 8, 0, 1))  # after DISC: ignored
    assert drain(conn) == []


@pytest.mark.parametrize("structured", [True, False])
def test_invalid_requests_get_error_replies(structured: bool) -> None:
    conn, _ = go("disk", structured=structured)
    conn.receive_data(request(w.CMD_READ, 1, SIZE - 1, 2)  # past the end
                      + request(w.CMD_WRITE, 2, SIZE - 1, data=b"xy")  # past the end
                      + request(42, 3)  # unknown command
                      + request(w.CMD_READ, 4, 0, 1, flags=0x80)  # unknown flag
                      + request(w.CMD_BLOCK_STATUS, 5, 0, 512)  # no contexts
                      + request(w.CMD_READ, 6, 0, 33 << 20)  # too long
                      + request(w.CMD_WRITE_ZEROES, 7, 0, 512, flags=w.CMD_FLAG_FAST_ZERO)
                      + request(w.CMD_READ, 8, 0, 0)  # empty: trivially fine
                      + request(w.CMD_READ, 9, 0, 1, flags=w.CMD_FLAG_DF))
    events = drain(conn)
    errors = {r.handle: r.error for r in replies_of(conn)}
    assert errors == {1: w.EINVAL, 2: w.ENOSPC, 3: w.EINVAL, 4: w.EINVAL, 5: w.EINVAL,
                      6: w.EINVAL, 7: w.ENOTSUP, 8: 0,
                      **({} if structured else {9: w.EINVAL})}
    assert events == ([Request(w.CMD_READ, w.CMD_FLAG_DF, 9, 0, 1)] if structured else [])


def test_read_only_export_refuses_writes_after_consuming_payload() -> None:
    conn, _ = go("ro")
    conn.receive_data(request(w.CMD_WRITE, 1, 0, data=b"z" * 100)
                      + request(w.CMD_TRIM, 2, 0, 10) + request(w.CMD_READ, 3, 0, 10))
    assert drain(conn) == [Request(w.CMD_READ, 0, 3, 0, 10)]
    assert {r.handle: r.error for r in replies_of(conn)} == {1: w.EPERM, 2: w.EPERM}


def test_fast_zero_allowed_where_cheap() -> None:
    conn, _ = go("fast")
    conn.receive_data(request(w.CMD_WRITE_ZEROES, 1, 0, 512, flags=w.CMD_FLAG_FAST_ZERO)
                      + request(w.CMD_WRITE_ZEROES, 2, 0, 512,
                                flags=w.CMD_FLAG_FAST_ZERO | w.CMD_FLAG_NO_HOLE))
    assert [e.handle for e in drain(conn) if isinstance(e, Request)] == [1]
    assert {r.handle: r.error for r in replies_of(conn)} == {2: w.ENOTSUP}


def test_bad_request_magic_is_fatal() -> None:
    conn, _ = go()
    conn.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    with pytest.raises(ProtocolError):
        drain(conn)


def test_huge_write_is_fatal_without_buffering() -> None:
    conn, _ = go()
    conn.receive_data(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_WRITE, 1, 0, 0xFFFFFFFF))
    with pytest.raises(ProtocolError, match="limit"):
        drain(conn)


def test_flooding_without_reading_is_fatal() -> None:
    conn, _ = go()
    with pytest.raises(ProtocolError):
        for _ in range(64):
            conn.receive_data(request(w.CMD_READ, 1, 0, 1) * 40000)


def test_eof() -> None:
    conn, _ = go()
    conn.receive_data(request(w.CMD_READ, 1, 0, 1)[:10])
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed(clean=False)]
    conn, _ = go()
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed(clean=True)]


def test_shutdown_errors_new_requests() -> None:
    conn, _ = go()
    conn.shutdown()
    conn.receive_data(request(w.CMD_READ, 1, 0, 512) + request(w.CMD_WRITE, 2, data=b"a"))
    assert drain(conn) == []
    assert {r.handle: r.error for r in replies_of(conn)} == {1: w.ESHUTDOWN, 2: w.ESHUTDOWN}


def drain_taking_reads(conn: ServerConnection, limit: int, max_bytes: int) -> list[Event]:
    """drain(), as the server does it: plain reads in takes, the rest as events."""
    events: list[Event] = []
    while True:
        reads = conn.take_reads(limit, max_bytes)
        assert len(reads) <= limit
        assert sum(r[5] for r in reads[:-1]) < max(max_bytes, 1)
        events += [Request(r[2], r[1], r[3], r[4], r[5]) for r in reads]
        if reads:
            continue
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        assert not isinstance(ev, type(NEED_DATA))
        events.append(ev)


def test_take_reads_takes_only_plain_reads_in_order() -> None:
    conn, _ = go("disk")
    conn.receive_data(request(w.CMD_READ, 1, 0, 4096)
                      + request(w.CMD_READ, 2, 4096, 512, flags=w.CMD_FLAG_FUA)
                      + request(w.CMD_READ, 3, 0, 1, flags=w.CMD_FLAG_DF)  # not plain
                      + request(w.CMD_READ, 4, SIZE - 512, 512)
                      + request(w.CMD_READ, 5, SIZE - 1, 2)  # past the end: an error
                      + request(w.CMD_READ, 6, 0, 0)  # empty: done at once
                      + request(w.CMD_WRITE, 7, 0, data=b"ab")
                      + request(w.CMD_READ, 8, 8, 8)
                      + request(w.CMD_READ, 9, 16, 8)[:20])  # incomplete
    assert [r[3] for r in conn.take_reads(16, 1 << 20)] == [1, 2]
    assert conn.take_reads(16, 1 << 20) == []  # the DF read waits for next_event
    assert conn.next_event() == Request(w.CMD_READ, w.CMD_FLAG_DF, 3, 0, 1)
    assert [r[3:] for r in conn.take_reads(16, 1 << 20)] == [(4, SIZE - 512, 512)]
    assert conn.next_event() == Request(w.CMD_WRITE, 0, 7, 0, 2, b"ab")
    assert {r.handle: r.error for r in replies_of(conn)} == {5: w.EINVAL, 6: 0}
    assert [r[3] for r in conn.take_reads(16, 1 << 20)] == [8]
    assert conn.take_reads(16, 1 << 20) == [] and conn.next_event() is NEED_DATA
    conn.receive_data(request(w.CMD_READ, 9, 16, 8)[20:])
    assert [r[3] for r in conn.take_reads(16, 1 << 20)] == [9]


def test_take_reads_limits() -> None:
    conn, _ = go("disk")
    conn.receive_data(b"".join(request(w.CMD_READ, h, h * 4096, 4096) for h in range(10)))
    assert [r[3] for r in conn.take_reads(3, 1 << 20)] == [0, 1, 2]
    # Bytes: requests are taken while less than max_bytes are taken.
    assert [r[3] for r in conn.take_reads(16, 8192)] == [3, 4]
    assert [r[3] for r in conn.take_reads(16, 1)] == [5]
    assert conn.take_reads(0, 1 << 20) == []
    assert [r[3] for r in conn.take_reads(16, 1 << 20)] == [6, 7, 8, 9]


def test_take_reads_outside_transmission_and_at_shutdown() -> None:
    conn = new_conn()
    conn.receive_data(client_flags())
    assert conn.take_reads(16, 1 << 20) == []
    conn, _ = go("disk")
    conn.shutdown()
    conn.receive_data(request(w.CMD_READ, 1, 0, 512))
    assert conn.take_reads(16, 1 << 20) == []
    assert drain(conn) == []
    assert {r.handle: r.error for r in replies_of(conn)} == {1: w.ESHUTDOWN}


def run_script_taking_reads(chunks: list[bytes], limit: int,
                            max_bytes: int) -> tuple[list[Event], bytes]:
    conn = new_conn()
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain_taking_reads(conn, limit, max_bytes)
        out += conn.data_to_send()
    return events, out


@given(st.lists(st.integers(min_value=1, max_value=97), max_size=60),
       st.integers(1, 20), st.integers(1, 10000))
def test_taking_reads_equals_events_alone(cuts: list[int], limit: int, max_bytes: int) -> None:
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(SCRIPT[pos:pos + c])
        pos += c
    chunks.append(SCRIPT[pos:])
    assert run_script_taking_reads(chunks, limit, max_bytes) == run_script([SCRIPT])


def test_reply_builders() -> None:
    conn, _ = go(contexts=("base:allocation", "qemu:allocation-depth"))
    out = (conn.read_header(1, 4096, 3) + b"abc" + conn.reply_ok(2)
           + conn.reply_error(3, w.EIO, "boom")
           + conn.reply_block_status(4, [(1, [(512, 0), (512, 3)]), (2, [(1024, 1)])])
           + conn.reply_done(5, w.CMD_READ))
    r1, r2, r3, r4, r5 = parse_replies(out, {})[0]
    assert r1.data == b"abc" and w.U64.unpack_from(r1.chunks[0][2])[0] == 4096
    assert r2.error == 0 and r3.error == w.EIO and r3.message == "boom"
    assert [c[0] for c in r4.chunks] == [0, w.REPLY_FLAG_DONE]
    assert r4.chunks[0][2] == w.U32.pack(1) + w.BLOCK_DESCRIPTOR.pack(512, 0) + \
        w.BLOCK_DESCRIPTOR.pack(512, 3)
    assert r5.chunks == [(w.REPLY_FLAG_DONE, w.REPLY_TYPE_NONE, b"")]
    simple, _ = go(structured=False)
    assert simple.read_header(7, 0, 3) == w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, 7)


def test_extent_descriptors() -> None:
    extents = [Extent(0, 4096, data=True, zero=False),
               Extent(4096, 4096, data=True, zero=False, depth=2),
               Extent(8192, 8192, data=False, zero=True, depth=0)]
    base = w.CONTEXT_BASE_ALLOCATION
    assert extent_descriptors(extents, 1024, 14336, base) == [
        (7168, 0), (7168, w.STATE_HOLE | w.STATE_ZERO)]
    assert extent_descriptors(extents, 1024, 14336, base, req_one=True) == [(7168, 0)]
    assert extent_descriptors(extents, 0, 16384, w.CONTEXT_ALLOCATION_DEPTH) == [
        (4096, 1), (4096, 2), (8192, 0)]
    # A layer reporting nothing useful: one safe descriptor.
    assert extent_descriptors([], 0, 512, base) == [(512, 0)]
    assert extent_descriptors([Extent(512, 512, True, False)], 0, 1024, base) == [(1024, 0)]


# --- incremental input ---------------------------------------------------------------------
SCRIPT = (client_flags() + option(w.OPT_LIST) + option(w.OPT_STRUCTURED_REPLY)
          + option(w.OPT_SET_META_CONTEXT, meta_data("disk", ["base:allocation"]))
          + option(w.OPT_GO, go_data("disk", (w.INFO_BLOCK_SIZE,)))
          + b"".join(request(w.CMD_WRITE, i, i * 100, data=bytes([i]) * (i * 37))
                     + request(w.CMD_READ, 1000 + i, i, 4096)
                     + request(w.CMD_BLOCK_STATUS, 2000 + i, 0, 8192)
                     + request(77, 3000 + i)
                     for i in range(1, 20))
          + request(w.CMD_DISC, 9999))


def run_script(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    conn = new_conn()
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain(conn)
        out += conn.data_to_send()
    return events, out


def test_byte_at_a_time_equals_all_at_once() -> None:
    whole = run_script([SCRIPT])
    assert len(whole[0]) == 1 + 3 * 19 + 1
    assert run_script([SCRIPT[i:i + 1] for i in range(len(SCRIPT))]) == whole


@given(st.lists(st.integers(min_value=1, max_value=97), max_size=60))
def test_any_split_equals_all_at_once(cuts: list[int]) -> None:
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(SCRIPT[pos:pos + c])
        pos += c
    chunks.append(SCRIPT[pos:])
    assert run_script(chunks) == run_script([SCRIPT])


# --- fuzz ------------------------------------------------------------------------------------
def feed_fuzz(conn: ServerConnection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for ev in drain(conn):
                if isinstance(ev, StartTLS):
                    conn.tls_started()
            conn.data_to_send()
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=8), st.booleans())
def test_fuzz_random_bytes(chunks: list[bytes], tls: bool) -> None:
    feed_fuzz(ServerConnection(EXPORTS, tls=tls), chunks)


message = st.one_of(
    st.builds(option, st.integers(0, 12), st.binary(max_size=40)),
    st.builds(lambda n, q: option(w.OPT_SET_META_CONTEXT, meta_data(n, q)),
              st.sampled_from(["disk", "ro", "", "x"]),
              st.lists(st.sampled_from(["base:allocation", "qemu:", "base:", "x:y"]))),
    st.builds(lambda n: option(w.OPT_GO, go_data(n)), st.sampled_from(["disk", "ro", "?"])),
    st.builds(request, st.integers(0, 9), st.integers(0, 2**64 - 1),
              st.sampled_from([0, 1, SIZE - 1, SIZE, 2**63]),
              st.sampled_from([0, 1, 4096, SIZE, 2**32 - 1]), st.integers(0, 0xFFFF)),
    st.builds(lambda d: request(w.CMD_WRITE, 1, 0, data=d), st.binary(max_size=64)),
    st.binary(max_size=30),
)


@settings(max_examples=300)
@given(st.lists(message, max_size=20), st.booleans())
def test_fuzz_message_sequences(messages: list[bytes], structured: bool) -> None:
    conn = ServerConnection(EXPORTS, tls=True)
    prefix = client_flags() + (option(w.OPT_STRUCTURED_REPLY) if structured else b"")
    feed_fuzz(conn, [prefix, *messages])


def outcome(conn: ServerConnection, chunks: list[bytes], take: bool) -> tuple[Any, ...]:
    events: list[Event] = []
    out = b""
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            events += drain_taking_reads(conn, 4, 4096) if take else drain(conn)
            out += conn.data_to_send()
    except ProtocolError as e:
        return events, out, str(e)
    return events, out, None


@settings(max_examples=300)
@given(st.lists(message, max_size=20), st.booleans())
def test_fuzz_taking_reads_equals_events_alone(messages: list[bytes], structured: bool) -> None:
    prefix = client_flags() + (option(w.OPT_STRUCTURED_REPLY) if structured else b"")
    chunks = [prefix + option(w.OPT_GO, go_data("disk")), *messages]
    assert (outcome(ServerConnection(EXPORTS), chunks, take=True)
            == outcome(ServerConnection(EXPORTS), chunks, take=False))
