"""The node configuration: one TOML file (``serve --config node.toml``).

    [server]
    socket = "/run/bootcache/bootcache.sock"   # NBD on a UNIX socket
    socket_mode = "0660"                       # default 0600
    socket_group = "kvm"                       # group of the socket (QEMU's)
    listen = ["127.0.0.1:10809"]               # NBD on TCP
    control = "/run/bootcache/bootcache.ctl"   # default: socket + ".ctl"
    metrics = "127.0.0.1:9410"                 # Prometheus /metrics
    readahead = "256K"                         # caches fetch this past a miss
    prefetch = true                            # caches prefetch their boot profile

    [tls]                                      # optional
    cert = "/etc/bootcache/server.pem"
    key = "/etc/bootcache/server.key"
    ca = "/etc/bootcache/ca.pem"               # require client certificates
    required = true

    [backing]
    dirs = ["/var/lib/bootcache"]              # images and backing files live here
    trust = false

    [remote]                                   # remote bases (HTTP, S3, NBD)
    deadline = 30                              # seconds a read waits out an outage
    timeout = 15                               # one attempt
    retries = 64                               # within the deadline

    [[export]]                                 # the catalog, one table per export
    image = "/var/lib/bootcache/debian12-cache.qcow2"
    name = "debian12"                          # default: file name less .qcow2
    read_only = false

Every key is checked on its own, then the whole file across keys; an error
names the line and the reason. A reload (SIGHUP) applies only the catalog's
difference; other settings need a restart, and a reload says so.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from bootcache.errors import BootcacheError


class ConfigError(BootcacheError):
    """The node configuration cannot be used; it names the line and the reason."""


@dataclass(frozen=True)
class ExportSpec:
    image: str
    name: str | None = None
    read_only: bool = False


@dataclass
class NodeConfig:
    """Everything a daemon needs to start (from a file or the command line)."""

    socket: str | None = None
    socket_mode: int = 0o600
    socket_group: str | None = None
    listen: list[tuple[str, int]] = field(default_factory=list)
    control: str | None = None
    metrics: tuple[str, int] | None = None
    readahead: int = 0
    #: Caches fetch the clusters their boot profile names in the background.
    prefetch: bool = True
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_required: bool = False
    backing_dirs: list[str] | None = None
    trust_backing: bool = False
    read_only: bool = False  # every export read-only (serve --read-only)
    #: Options of remote bases (RemoteOptions' fields), as given.
    remote: dict[str, str] = field(default_factory=dict)
    exports: list[ExportSpec] = field(default_factory=list)

    def control_path(self) -> str | None:
        if self.control:
            return self.control
        return self.socket + ".ctl" if self.socket else None

    def check(self) -> None:
        """Checks across keys (each key was checked when read)."""
        if not self.socket and not self.listen:
            raise ConfigError("give a UNIX socket and/or TCP listen addresses")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("a TLS certificate and its key go together")
        if self.tls_required and not self.tls_cert:
            raise ConfigError("TLS required but no certificate given")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("a TLS CA (client certificates) needs a server certificate")
        if not self.control_path():
            raise ConfigError("no control socket: give one, or a UNIX socket to derive it")
        from bootcache.sources.resilience import RemoteOptions

        try:
            RemoteOptions.from_mapping(self.remote)
        except ValueError as e:
            raise ConfigError(f"remote base options: {e}") from None

    def settings(self) -> dict[str, Any]:
        """What a reload cannot change without a restart."""
        return {k: v for k, v in vars(self).items() if k != "exports"}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 256K, 1M)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [addr]:port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


_SECTIONS: dict[str, set[str]] = {
    "server": {"socket", "socket_mode", "socket_group", "listen", "control", "metrics",
               "readahead", "prefetch"},
    "tls": {"cert", "key", "ca", "required"},
    "backing": {"dirs", "trust"},
    "remote": {"timeout", "connect_timeout", "deadline", "retries", "backoff", "backoff_max",
               "concurrency", "max_request"},
}
_EXPORT_KEYS = {"image", "name", "read_only"}


class _Reader:
    """Reads a parsed document, pointing errors at the lines they come from."""

    def __init__(self, text: str, path: str) -> None:
        self.lines = text.splitlines()
        self.path = path

    def line_of(self, key: str, section: str | None, index: int = 0) -> int:
        """The line of ``key`` in ``[section]`` (the index-th ``[[section]]``)."""
        current, seen = None, -1
        header = re.compile(r"\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")
        for no, line in enumerate(self.lines, 1):
            m = header.match(line)
            if m:
                current = m.group(1)
                if current == section:
                    seen += 1
                    if not key and seen == index:
                        return no
                continue
            if current == section and (seen == index or section is None) and key and \
                    re.match(rf"\s*{re.escape(key)}\s*=", line):
                return no
        return 0

    def fail(self, reason: str, key: str = "", section: str | None = None,
             index: int = 0) -> ConfigError:
        line = self.line_of(key, section, index)
        where = f"{self.path}, line {line}" if line else self.path
        return ConfigError(f"{where}: {reason}")


def load(path: str) -> NodeConfig:
    """Read and check a node configuration file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        text = raw.decode()
        doc = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e  # tomllib names line and column
    return parse(doc, _Reader(text, path))


def parse(doc: dict[str, Any], r: _Reader) -> NodeConfig:
    cfg = NodeConfig()
    for top in doc:
        if top not in _SECTIONS and top != "export":
            raise r.fail(f"unknown section [{top}] (known: server, tls, backing, remote, "
                         "export)",
                         section=top)
    for section, keys in _SECTIONS.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise r.fail(f"{section} must be a table", key=section)
        for key, value in table.items():
            if key not in keys:
                raise r.fail(f"unknown key {key!r} in [{section}] "
                             f"(known: {', '.join(sorted(keys))})", key, section)
            try:
                _set(cfg, section, key, value)
            except (TypeError, ValueError) as e:
                raise r.fail(f"{key}: {e}", key, section) from None
    exports = doc.get("export", [])
    if not isinstance(exports, list):
        raise r.fail("export must be an array of tables: [[export]]", section="export")
    names: set[str] = set()
    for i, table in enumerate(exports):
        unknown = set(table) - _EXPORT_KEYS
        if unknown:
            key = sorted(unknown)[0]
            raise r.fail(f"unknown key {key!r} in [[export]] "
                         f"(known: {', '.join(sorted(_EXPORT_KEYS))})", key, "export", i)
        image, name = table.get("image"), table.get("name")
        read_only = table.get("read_only", False)
        if not isinstance(image, str) or not image:
            raise r.fail("every [[export]] needs image = PATH", "image" if "image" in table
                         else "", "export", i)
        if name is not None and not isinstance(name, str):
            raise r.fail("name must be a string", "name", "export", i)
        if not isinstance(read_only, bool):
            raise r.fail("read_only must be true or false", "read_only", "export", i)
        spec = ExportSpec(image, name, read_only)
        final = name or image.rsplit("/", 1)[-1].removesuffix(".qcow2")
        if final in names:
            raise r.fail(f"export name {final!r} given twice", "name" if name else "image",
                         "export", i)
        names.add(final)
        cfg.exports.append(spec)
    try:
        cfg.check()
    except ConfigError as e:
        raise ConfigError(f"{r.path}: {e}") from None
    return cfg


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("expected a non-empty string")
    return value


def _set(cfg: NodeConfig, section: str, key: str, value: Any) -> None:
    if section == "server":
        if key == "socket":
            cfg.socket = _string(value)
        elif key == "socket_mode":
            mode = int(_string(value), 8)
            if not 0 <= mode <= 0o777:
                raise ValueError(f"{value!r} is not a permission mode")
            cfg.socket_mode = mode
        elif key == "socket_group":
            cfg.socket_group = _string(value)
        elif key == "listen":
            if not isinstance(value, list):
                raise TypeError('expected a list like ["127.0.0.1:10809"]')
            cfg.listen = [parse_address(_string(v)) for v in value]
        elif key == "control":
            cfg.control = _string(value)
        elif key == "metrics":
            cfg.metrics = parse_address(_string(value))
        elif key == "readahead":
            cfg.readahead = parse_size(_string(value)) if isinstance(value, str) else \
                _nonneg(value)
        elif key == "prefetch":
            cfg.prefetch = _bool(value)
    elif section == "tls":
        if key == "required":
            cfg.tls_required = _bool(value)
        else:
            setattr(cfg, f"tls_{key}", _string(value))
    elif section == "remote":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise TypeError("expected a number")
        cfg.remote[key] = str(value)
    elif section == "backing":
        if key == "dirs":
            if not isinstance(value, list):
                raise TypeError('expected a list of folders like ["/var/lib/bootcache"]')
            cfg.backing_dirs = [_string(v) for v in value]
        elif key == "trust":
            cfg.trust_backing = _bool(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


def _nonneg(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("expected a size like \"256K\" or a byte count")
    return value


__all__ = ["ConfigError", "ExportSpec", "NodeConfig", "load", "parse_address", "parse_size"]
