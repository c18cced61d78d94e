"""The project's exception types.

Every failure that comes from bad input (a malformed or hostile image, a
refused backing file, a lock held by another process, a broken remote) is
raised as a subclass of :class:`BootcacheError`, so callers can tell "the
input is bad" from "bootcache has a bug".
"""

from __future__ import annotations


class BootcacheError(Exception):
    """Base class for all errors bootcache raises on purpose."""


class ImageFormatError(BootcacheError):
    """The image is malformed: a field is out of range or inconsistent."""


class UnsupportedFeatureError(BootcacheError):
    """The image uses a feature this implementation refuses to handle."""


class ImageCorruptError(BootcacheError):
    """The image's metadata is corrupt; it must not be written."""


class ImageLockedError(BootcacheError):
    """Another process holds a lock that conflicts with the requested access."""


class ReadOnlyError(BootcacheError):
    """A write was attempted on an image or layer opened read-only."""


class BackingPolicyError(BootcacheError):
    """A backing file was refused by the chain-opening policy."""


class SourceError(BootcacheError):
    """A byte source (file, NBD, HTTP, S3) failed to deliver data."""


class StaleBaseError(BootcacheError):
    """A cache image no longer matches the base it was filled from."""
