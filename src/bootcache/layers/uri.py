"""Open a byte source from a path or URI, as a qcow2 backing-file name reads.

It sits with the layers, above both the byte sources and the NBD client,
because it chooses among all of them.

    /path/to/file, relative/path, file:///path   -> FileSource
    http://host/path, https://host/path         -> HttpSource
    s3://bucket/key                             -> S3Source
    nbd://host[:port]/name, nbds://...,
    nbd+unix:///name?socket=PATH, nbds+unix://  -> NbdSource (bootcache.nbd.client)

``options`` are checked here: the shared resilience keys (timeout, deadline,
retries, ...) go to RemoteOptions for every remote kind, the rest must be
known to the chosen kind; a typo fails instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from bootcache.errors import SourceError
from bootcache.sources.base import ByteSource
from bootcache.sources.resilience import REMOTE_OPTION_KEYS, split_options

_NBD_SCHEMES = ("nbd", "nbds", "nbd+tcp", "nbds+tcp", "nbd+unix", "nbds+unix")
# Source-specific option keys, per kind (the shared ones are in RemoteOptions).
_KIND_OPTIONS: dict[str, frozenset[str]] = {
    "file": frozenset({"lock"}),
    "http": frozenset({"headers", "ca_file", "insecure", "trust_env", "if_match"}),
    "s3": frozenset({"endpoint_url", "region", "profile", "anonymous", "addressing_style",
                     "if_match"}),
    "nbd": frozenset({"ca_file", "cert_file", "key_file", "insecure", "connections",
                      "tls_hostname"}),
}
_BOOL_OPTIONS = frozenset({"lock", "insecure", "trust_env", "if_match", "anonymous"})


def source_kind(uri: str) -> str:
    """"file", "http", "s3" or "nbd"; ValueError for a scheme we do not read."""
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("", "file"):
        return "file"
    if scheme in ("http", "https"):
        return "http"
    if scheme == "s3":
        return "s3"
    if scheme in _NBD_SCHEMES:
        return "nbd"
    raise ValueError(f"{uri}: unsupported URI scheme {scheme!r}")


def is_remote(uri: str) -> bool:
    return source_kind(uri) != "file"


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"source option {key}={value!r}: not a boolean")


def check_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse unknown keys for ``kind``; convert boolean spellings."""
    allowed = _KIND_OPTIONS[kind] | (REMOTE_OPTION_KEYS if kind != "file" else frozenset())
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(f"source option {key!r} does not apply to {kind} sources")
        out[key] = _as_bool(key, value) if key in _BOOL_OPTIONS else value
    return out


def file_path(uri: str) -> str:
    """The local path named by a plain path or a file:// URI."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{uri}: file URIs must name a local path")
    return unquote(parts.path)


async def open_source(uri: str, *, writable: bool = False, **options: Any) -> ByteSource:
    """Open the byte source ``uri`` names; remote sources are read-only."""
    kind = source_kind(uri)
    opts = check_options(kind, options)
    if kind == "file":
        from bootcache.sources.file import FileSource
        return FileSource(file_path(uri), writable=writable, lock=opts.get("lock", True))
    if writable:
        raise SourceError(f"{uri}: {kind} sources are read-only")
    remote, rest = split_options(opts)
    if kind == "http":
        from bootcache.sources.http import HttpSource
        return await HttpSource.open(uri, remote, **rest)
    if kind == "s3":
        from bootcache.sources.s3 import S3Source
        return await S3Source.open(uri, remote, **rest)
    from bootcache.nbd.client import NbdSource

    source: ByteSource = await NbdSource.open(uri, remote, **rest)
    return source
