"""The NBD export a hot-plugged disk reads through, and the VM's overlay on it.

Before QEMU is touched, the export must answer a real NBD handshake (the
same client bootcache's own NBD backing files use): a typo in its name or a
daemon that is not running then fails here, with the VM left alone. The
overlay is the VM's private, writable qcow2 whose backing is the export,
as ``bootcache create -b URI -F raw`` makes it.
"""

from __future__ import annotations

import asyncio
import os
from urllib.parse import quote

from bootcache import api
from bootcache.errors import SourceError
from bootcache.nbd.client import NbdConnection, parse_nbd_uri
from bootcache.vm.monitor import HotplugError

PROBE_TIMEOUT = 10.0


def export_uri(socket: str, export: str) -> str:
    """The NBD URI QEMU and bootcache both read: ``nbd+unix:///NAME?socket=S``."""
    return f"nbd+unix:///{quote(export, safe='')}?socket={socket}"


async def probe_export(socket: str, export: str, *, timeout: float = PROBE_TIMEOUT) -> int:
    """Open the export once (handshake and close); its size in bytes."""
    uri = export_uri(socket, export)
    if not os.path.exists(socket):
        raise HotplugError(f"export {export!r}: no NBD socket at {socket} "
                           "(is `bootcache serve` running?)")
    try:
        async with asyncio.timeout(timeout):
            conn = await NbdConnection.connect(parse_nbd_uri(uri), name=uri)
    except ValueError as e:
        raise HotplugError(f"export {export!r}: {e}") from e
    except TimeoutError:
        raise HotplugError(f"export {export!r} on {socket}: no answer within "
                           f"{timeout:g} s") from None
    except SourceError as e:
        raise HotplugError(f"export {export!r} on {socket}: {e}") from e
    await conn.close()
    return conn.info.size


def create_overlay(path: str, socket: str, export: str, size: int) -> None:
    """A new qcow2 at ``path`` over the export (raw), as big as the export."""
    api.create(path, size, backing_file=export_uri(socket, export), backing_fmt="raw")
