"""A client of the daemon's control API (``bootcache ctl``, ``cache stats``).

Plain ``http.client`` over the UNIX socket: the CLI must start fast, and a
request or two does not need an async HTTP stack.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import quote, urlencode

from bootcache.errors import BootcacheError

DEFAULT_CONTROL = "/run/bootcache/bootcache.sock.ctl"


class ControlError(BootcacheError):
    """The daemon refused a request, or could not be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def default_control() -> str:
    return os.environ.get("BOOTCACHE_CONTROL") or DEFAULT_CONTROL


class ControlClient:
    """Requests to one daemon's control socket."""

    def __init__(self, path: str | None = None, timeout: float = 60.0) -> None:
        self.path = path or default_control()
        self.timeout = timeout

    def request(self, method: str, url: str, body: Any = None) -> dict[str, Any]:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            try:
                payload = json.dumps(body).encode() if body is not None else None
                headers = {"Content-Type": "application/json"} if payload else {}
                conn.request(method, url, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except OSError as e:
                raise ControlError(f"{self.path}: cannot reach the daemon's control socket "
                                   f"({e.strerror or e}); is `bootcache serve` running?") from e
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ControlError(f"{self.path}: not a bootcache control socket "
                               f"(HTTP {resp.status})", resp.status) from None
        if resp.status >= 400:
            raise ControlError(str(doc.get("error", f"HTTP {resp.status}")), resp.status)
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
        url = f"/v1/exports/{quote(name, safe='')}" + ("?force=1" if force else "")
        return self.request("DELETE", url)

    def stats(self, name: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/stats" + (f"/{quote(name, safe='')}" if name else ""))

    def node(self, image: str) -> dict[str, Any]:
        return self.request("GET", "/v1/nodes?" + urlencode({"image": image}))

    def reload(self) -> dict[str, Any]:
        return self.request("POST", "/v1/reload", {})


__all__ = ["ControlClient", "ControlError", "default_control"]
