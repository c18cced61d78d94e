"""The control client (``bootcache ctl``): one HTTP/1.0 request per connection
over the UNIX socket, and a clear error for whatever is not a daemon's
answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bootcache.daemon.ctlclient import _parse_answer
from cache.conftest import bootcache


def test_list_add_remove_through_the_client(tmp_path: Path, daemons: Any) -> None:
    bootcache("create", "-q", tmp_path / "a.qcow2", "1M")
    bootcache("create", "-q", tmp_path / "b.qcow2", "2M")
    d = daemons(f"{tmp_path / 'a.qcow2'}=a")
    assert d.ctl("add", f"{tmp_path / 'b.qcow2'}=b", "--read-only").stdout.strip() == \
        f"added b: {tmp_path / 'b.qcow2'} (read-only)"
    listed = json.loads(d.ctl("list", "--output", "json").stdout)
    assert {e["name"]: e["size"] for e in listed} == {"a": 1 << 20, "b": 2 << 20}
    # A name that needs quoting in the URL reaches the daemon as it was typed.
    refused = d.ctl("remove", "no such/name?", check=False)
    assert refused.returncode == 1
    assert "no such/name?" in refused.stderr
    d.ctl("remove", "b")
    assert [e["name"] for e in json.loads(d.ctl("list", "--output", "json").stdout)] == ["a"]


def test_an_nbd_socket_is_not_a_control_socket(tmp_path: Path, daemons: Any) -> None:
    bootcache("create", "-q", tmp_path / "a.qcow2", "1M")
    d = daemons(str(tmp_path / "a.qcow2"))
    d.control = d.sock  # the NBD socket: it greets in NBD, not HTTP
    proc = d.ctl("list", check=False)
    assert proc.returncode == 1
    assert f"{d.sock}: not a bootcache control socket" in proc.stderr


def test_no_daemon_is_a_clear_error(tmp_path: Path, daemons: Any) -> None:
    bootcache("create", "-q", tmp_path / "a.qcow2", "1M")
    d = daemons(str(tmp_path / "a.qcow2"), start=False)
    proc = d.ctl("list", check=False)
    assert proc.returncode == 1
    assert "cannot reach the daemon's control socket" in proc.stderr
    assert "is `bootcache serve` running?" in proc.stderr


@pytest.mark.parametrize(("raw", "expected"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", (200, b"{}")),
    (b"HTTP/1.1 404 Not Found\r\ncontent-length:  9\r\n\r\n{\"a\": 1}\n", (404, b"{\"a\": 1}\n")),
    (b"HTTP/1.0 200 OK\r\n\r\n[1]", (200, b"[1]")),  # no length: the body ends at the close
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", None),  # cut short
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}", None),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", None),  # the headers never end
    (b"NBDMAGIC\x00\x00\x00\x00", None),
    (b"HTTP/1.1 OK\r\n\r\n{}", None),
    (b"", None),
])
def test_parse_answer(raw: bytes, expected: tuple[int, bytes] | None) -> None:
    assert _parse_answer(raw) == expected
