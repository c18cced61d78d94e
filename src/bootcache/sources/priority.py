"""Which reads may make way: a background reader's (a prefetch's) are marked.

A prefetcher runs its requests inside :func:`background`; a source that
shares connections between requests (the NBD client) asks
:func:`is_background` when it sends one, and keeps demand reads off the
connections that carry background ones, so a guest's miss never queues
behind a prefetch's reply. The mark is a context variable: it follows the
prefetch's task down the layers, and every task that task starts, without
an argument on each layer's ``pread``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_background: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "bootcache_background_read", default=False)


def is_background() -> bool:
    """Whether the current task reads for a background reader."""
    return _background.get()


@contextmanager
def background() -> Iterator[None]:
    """Reads made inside this block (and by tasks it starts) are background reads."""
    token = _background.set(True)
    try:
        yield
    finally:
        _background.reset(token)


__all__ = ["background", "is_background"]
