"""bootcache: qcow2 cache images between a remote base and VM overlays.

The synchronous API (see :mod:`bootcache.api`)::

    bootcache.create(path, size, backing_file=..., backing_fmt=...)
    with bootcache.open(path, writable=True) as img:
        img.write(offset, data); img.read(offset, length); img.flush()
"""

from bootcache.api import Image, create, open
from bootcache.errors import BootcacheError

__version__ = "0.1.0"
__all__ = ["BootcacheError", "Image", "__version__", "create", "open"]
