"""A QMP connection to one running QEMU, with errors that say what failed.

Wraps ``qemu.qmp.QMPClient``: a bounded connect (QEMU serves one QMP
client at a time per socket, so a busy monitor never answers), commands
whose failures become :class:`HotplugError`, the facts ``vm attach`` checks
before it changes anything, and a bounded wait for one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Callable
from types import TracebackType
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, Message, QMPClient, QMPError

from bootcache.errors import BootcacheError

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
# Where user-created devices (device_add / -device with an id) live in the QOM tree.
PERIPHERALS = "/machine/peripheral"


class HotplugError(BootcacheError):
    """A VM could not be changed as asked (it is left as it was, where possible)."""


class Monitor:
    """One QMP session; use ``async with await Monitor.open(path)``."""

    def __init__(self, path: str, client: QMPClient) -> None:
        self.path = path
        self._client = client

    @classmethod
    async def open(cls, path: str, *, timeout: float = CONNECT_TIMEOUT) -> Monitor:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise HotplugError(f"QMP socket {path}: {e.strerror}") from e
        if not stat.S_ISSOCK(mode):
            raise HotplugError(f"QMP socket {path}: not a socket")
        client = QMPClient(os.path.basename(path))
        try:
            async with asyncio.timeout(timeout):
                await client.connect(path)
        except TimeoutError:
            await _disconnect(client)
            raise HotplugError(f"QMP socket {path}: no answer within {timeout:g} s "
                               "(is another client connected to it?)") from None
        except (ConnectError, OSError) as e:
            raise HotplugError(f"QMP socket {path}: cannot connect: {e}") from e
        return cls(path, client)

    async def close(self) -> None:
        await _disconnect(self._client)

    async def __aenter__(self) -> Monitor:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; QEMU's refusal or a lost monitor is a HotplugError."""
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                return await self._client.execute(command, arguments)
        except ExecuteError as e:
            raise HotplugError(f"{command}: {e}") from e
        except TimeoutError:
            raise HotplugError(f"{command}: no reply within {COMMAND_TIMEOUT:g} s") from None
        except QMPError as e:
            raise HotplugError(f"{command}: QMP connection failed: {e}") from e

    async def node_names(self) -> set[str]:
        nodes = await self.execute("query-named-block-nodes", {"flat": True})
        return {n["node-name"] for n in nodes}

    async def block_backends(self) -> set[str]:
        """Names of the legacy ``-drive`` backends (they share the node namespace)."""
        return {b["device"] for b in await self.execute("query-block") if b.get("device")}

    async def device_ids(self) -> set[str]:
        children = await self.execute("qom-list", {"path": PERIPHERALS})
        return {c["name"] for c in children if c["type"].startswith("child<")}

    def listener(self, event: str, accept: Callable[[Message], bool]) -> EventWaiter:
        """Start listening now (before the command that causes ``event``)."""
        return EventWaiter(self._client, event, accept)


async def _disconnect(client: QMPClient) -> None:
    # disconnect() re-raises whatever ended the session (EOF when QEMU went
    # away); by then the outcome is decided, and that error would hide it.
    with contextlib.suppress(Exception):
        await client.disconnect()


class EventWaiter:
    """Collects one kind of event from the moment it is made until closed."""

    def __init__(self, client: QMPClient, event: str,
                 accept: Callable[[Message], bool]) -> None:
        self._client = client
        self._event = event
        self._accept = accept
        self._listener = EventListener(event)
        client.register_listener(self._listener)

    async def wait(self, timeout: float) -> Message:
        """The first matching event; TimeoutError if none comes in ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self._listener.get()
                if self._accept(event):
                    return event

    def close(self) -> None:
        self._client.remove_listener(self._listener)

    def __enter__(self) -> EventWaiter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
