"""A client of the daemon's control API (``bootcache ctl``, ``cache stats``).

One HTTP/1.0 request per connection over the UNIX socket: the daemon sends
its whole answer and closes, so the answer is everything read up to the end
(no keep-alive, no chunked bodies). ``http.client`` would do the same, but
its import (email parsing, ssl) took about a third of a ``ctl`` command's
start-up, and a CLI call makes one request.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from bootcache.errors import BootcacheError

DEFAULT_CONTROL = "/run/bootcache/bootcache.sock.ctl"
_MAX_ANSWER = 64 << 20  # a catalog of thousands of exports is a few MB


class ControlError(BootcacheError):
    """The daemon refused a request, or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _exchange(path: str, timeout: float, method: str, url: str,
              payload: bytes | None) -> bytes:
    """Send one request on a new connection; the raw answer, read to its end."""
    head = f"{method} {url} HTTP/1.0\r\nHost: localhost\r\n"
    if payload is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(head.encode("latin-1") + b"\r\n" + (payload or b""))
        chunks: list[bytes] = []
        size = 0
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_ANSWER:
                break
    return b"".join(chunks)


def _parse_answer(raw: bytes) -> tuple[int, bytes] | None:
    """(status, body) of an HTTP answer, or None if it is not a whole one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or \
            not parts[1].isdigit():
        return None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        # A body cut short (or a length we cannot read) is no answer.
        if name.strip().lower() == b"content-length" and (
                not value.strip().isdigit() or len(body) != int(value)):
            return None
    return int(parts[1]), body


def default_control() -> str:
    return os.environ.get("BOOTCACHE_CONTROL") or DEFAULT_CONTROL


class ControlClient:
    """Requests to one daemon's control socket."""

    def __init__(self, path: str | None = None, timeout: float = 60.0) -> None:
        self.path = path or default_control()
        self.timeout = timeout

    def request(self, method: str, url: str, body: Any = None) -> dict[str, Any]:
        payload = json.dumps(body).encode() if body is not None else None
        try:
            raw = _exchange(self.path, self.timeout, method, url, payload)
        except OSError as e:
            raise ControlError(f"{self.path}: cannot reach the daemon's control socket "
                               f"({e.strerror or e}); is `bootcache serve` running?") from e
        answer = _parse_answer(raw)
        if answer is None:
            raise ControlError(f"{self.path}: not a bootcache control socket "
                               "(no complete HTTP answer)")
        status, content = answer
        try:
            doc = json.loads(content)
        except ValueError:
            raise ControlError(f"{self.path}: not a bootcache control socket "
                               f"(HTTP {status})", status) from None
        if status >= 400:
            raise ControlError(str(doc.get("error", f"HTTP {status}")), status)
        if not isinstance(doc, dict):
            raise ControlError(f"{self.path}: unexpected answer")
        return doc

    def exports(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/exports")["exports"])

    def add(self, image: str, name: str | None = None, *, read_only: bool = False
            ) -> dict[str, Any]:
        body: dict[str, Any] = {"image": image, "read_only": read_only}
        if name:
            body["name"] = name
        return self.request("POST", "/v1/exports", body)

    def remove(self, name: str, *, force: bool = False) -> dict[str, Any]:
        from urllib.parse import quote  # a few ms of import that list and add skip

        url = f"/v1/exports/{quote(name, safe='')}" + ("?force=1" if force else "")
        return self.request("DELETE", url)

    def stats(self, name: str | None = None) -> dict[str, Any]:
        from urllib.parse import quote

        return self.request("GET", "/v1/stats" + (f"/{quote(name, safe='')}" if name else ""))

    def node(self, image: str) -> dict[str, Any]:
        from urllib.parse import urlencode

        return self.request("GET", "/v1/nodes?" + urlencode({"image": image}))

    def reload(self) -> dict[str, Any]:
        return self.request("POST", "/v1/reload", {})

    def publish(self, image: str, dest: str, level: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"image": image, "dest": dest}
        if level is not None:
            body["level"] = level
        return self.request("POST", "/v1/publish", body)


__all__ = ["ControlClient", "ControlError", "default_control"]
