"""Running a layer's coroutine to its end without an event loop.

The layers are coroutines so that a server can interleave many clients. A
command that reads one local image (``info``, ``check``) has nothing to
interleave, and a local file's reads complete inside the call: such a
coroutine finishes on its first step. Stepping it here spares the command
asyncio's import and an event loop, about a third of its start-up.

Only for work that never waits on the loop: anything that does (a thread
hop, a remote source, a sleep, a contended lock) needs ``asyncio.run``.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class NeedsEventLoop(RuntimeError):
    """The coroutine waited for something only an event loop delivers."""


def run_without_loop(coro: Coroutine[Any, Any, T]) -> T:
    """The result of ``coro``, run to its end right here.

    Raises NeedsEventLoop if it suspends. (One that asks for the running
    loop fails earlier, with asyncio's own RuntimeError.)
    """
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    name = getattr(coro, "__qualname__", repr(coro))
    raise NeedsEventLoop(f"{name} waited on an event loop; run it with asyncio.run")
