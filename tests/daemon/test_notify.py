"""notify() against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator

import pytest

from bootcache.daemon.notify import notify, notify_reloading


def _receiver(address: str) -> socket.socket:
    """A datagram socket like systemd's: it asks for the sender's credentials,
    which is how systemd attributes a message to the service's MAINPID."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(5)  # a bound on a broken send, not a wait for anything
    return sock


def _receive(sock: socket.socket) -> tuple[str, int]:
    """One datagram and the PID the kernel vouches sent it."""
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
    return data.decode(), pid


@pytest.fixture
def sockdir() -> Iterator[str]:
    # tmp_path can exceed the 107-byte limit of socket paths.
    d = tempfile.mkdtemp(prefix="notify.", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_path_socket_gets_the_daemon_lifecycle(sockdir: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(sockdir, "notify")
    with _receiver(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        states = ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
        for state in states:
            assert notify(state) is True
        got = [_receive(sock) for _ in states]
    assert [text for text, _ in got] == states
    assert {pid for _, pid in got} == {os.getpid()}


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"bootcache-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with _receiver("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1\nSTATUS=serving 2 exports") is True
        text, pid = _receive(sock)
    assert text == "READY=1\nSTATUS=serving 2 exports"
    assert pid == os.getpid()


def test_reloading_carries_a_monotonic_timestamp(sockdir: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(sockdir, "notify")
    with _receiver(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notify_reloading() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        text, _ = _receive(sock)
    fields = dict(line.split("=", 1) for line in text.split("\n"))
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_missing_socket_is_reported_not_raised(sockdir: str, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(sockdir, "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="bootcache.daemon.notify"):
        assert notify("READY=1") is False
    assert "failed" in caplog.text


def test_unsupported_address(monkeypatch: pytest.MonkeyPatch,
                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with caplog.at_level(logging.WARNING, logger="bootcache.daemon.notify"):
        assert notify("READY=1") is False
    assert "unsupported" in caplog.text
