"""bootcache: qcow2 cache images between a remote base and VM overlays.

The synchronous API (see :mod:`bootcache.api`)::

    bootcache.create(path, size, backing_file=..., backing_fmt=...)
    with bootcache.open(path, writable=True) as img:
        img.write(offset, data); img.read(offset, length); img.flush()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bootcache.errors import BootcacheError

if TYPE_CHECKING:
    from bootcache import api as api
    from bootcache.api import Image, create, open

__version__ = "0.1.0"
__all__ = ["BootcacheError", "Image", "__version__", "create", "open"]

# Every ``bootcache`` command imports this package first: the API (and the
# engine behind it) is loaded on first use, not here, so that a command pays
# only for what it runs.
_FROM_API = {"Image", "create", "open"}


def __getattr__(name: str) -> Any:
    if name == "api":
        return importlib.import_module("bootcache.api")
    if name in _FROM_API:
        value = getattr(importlib.import_module("bootcache.api"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'bootcache' has no attribute {name!r}")
