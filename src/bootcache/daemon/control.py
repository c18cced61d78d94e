"""The control API: a small JSON API over HTTP on a UNIX socket.

    GET    /v1/exports                    the exports: name, image, state, clients
    POST   /v1/exports                    {"image": PATH, "name": NAME?, "read_only": BOOL?}
    DELETE /v1/exports/NAME[?force=1]     remove (refused while clients are connected)
    GET    /v1/stats[/NAME]               counters of every export (or one)
    GET    /v1/nodes?image=PATH           counters of one open image (``cache stats``)
    POST   /v1/reload                     reread the node configuration (as SIGHUP)
    POST   /v1/publish                    {"image": PATH, "dest": PATH|s3://..., "level": N?}
                                          publish a cache being served

Every answer is a JSON object; errors are ``{"error": "..."}`` with a 4xx
status and change nothing. The socket is created with mode 0600, and each
connection's peer is checked with SO_PEERCRED: only root and the daemon's
own user may talk to it. docs/operations.md has examples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bootcache.daemon.exports import ExportError
from bootcache.daemon.view import NodeView

log = logging.getLogger("bootcache.control")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_MAX_BODY = 64 << 10


def peer_uid(request: web.Request) -> int | None:
    """The user id of the process at the other end of the UNIX socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    return int(_PEERCRED.unpack(raw)[1])


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlServer:
    """Serves the control API of one daemon on a UNIX socket."""

    def __init__(self, daemon: NodeView) -> None:
        self.daemon = daemon
        self.path = ""
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=_MAX_BODY)
        app.add_routes([
            web.get("/v1/exports", self.list_exports),
            web.post("/v1/exports", self.add_export),
            web.delete("/v1/exports/{name}", self.remove_export),
            web.get("/v1/stats", self.stats),
            web.get("/v1/stats/{name}", self.stats),
            web.get("/v1/nodes", self.node_stats),
            web.post("/v1/reload", self.reload),
            web.post("/v1/publish", self.publish),
        ])
        return app

    async def start(self, path: str) -> None:
        # Bind with a umask that leaves only the owner's bits: no window in
        # which another user could connect before the chmod.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.path = path

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        uid = peer_uid(request)
        if uid is None or uid not in (0, os.getuid()):
            log.warning("control: refused a client of uid %s", uid)
            return _error(403, "only root and the daemon's user may use the control socket")
        try:
            return await handler(request)
        except ExportError as e:
            return _error(e.status, str(e))
        except web.HTTPException as e:
            return _error(e.status, e.reason)

    # -- handlers ----------------------------------------------------------------

    async def list_exports(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"exports": [e.describe() for e in self.daemon.exports.entries()]})

    async def add_export(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        image, name, read_only = body.get("image"), body.get("name"), body.get("read_only", False)
        unknown = set(body) - {"image", "name", "read_only"}
        if unknown:
            raise ExportError(f"unknown field(s): {', '.join(sorted(unknown))}")
        if not isinstance(image, str) or not isinstance(name, (str, type(None))) \
                or not isinstance(read_only, bool):
            raise ExportError('expected {"image": string, "name": string?, "read_only": bool?}')
        entry = await self.daemon.exports.add(image, name, read_only=read_only)
        return web.json_response(entry.describe(), status=201)

    async def remove_export(self, request: web.Request) -> web.Response:
        force = request.query.get("force", "0") in ("1", "true", "yes")
        await self.daemon.exports.remove(request.match_info["name"], force=force)
        return web.json_response({"removed": request.match_info["name"]})

    async def stats(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name")
        if name is not None:
            return web.json_response(self.daemon.export_stats(self.daemon.exports.entry(name)))
        return web.json_response({"exports": {e.name: self.daemon.export_stats(e)
                                              for e in self.daemon.exports.entries()}})

    async def node_stats(self, request: web.Request) -> web.Response:
        image = request.query.get("image", "")
        stats = self.daemon.node_stats(image)
        if stats is None:
            raise ExportError(f"{image}: not open in this daemon", 404)
        return web.json_response(stats)

    async def reload(self, request: web.Request) -> web.Response:
        return web.json_response(await self.daemon.reload())

    async def publish(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        image, dest, level = body.get("image"), body.get("dest"), body.get("level")
        unknown = set(body) - {"image", "dest", "level"}
        if unknown:
            raise ExportError(f"unknown field(s): {', '.join(sorted(unknown))}")
        if not isinstance(image, str) or not isinstance(dest, str) \
                or not (level is None or (type(level) is int and 1 <= level <= 19)):
            raise ExportError('expected {"image": string, "dest": string, "level": 1-19?}')
        if "://" not in dest and not os.path.isabs(dest):
            raise ExportError(f"{dest}: a local destination must be an absolute path")
        return web.json_response(await self.daemon.publish(image, dest, level=level))


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ExportError("the request body must be a JSON object")
    return body


__all__ = ["ControlServer", "peer_uid"]
