"""The node daemon: one process that owns a node's images and serves them.

It ties together what the other modules of this package do on their own:

- the node graph (every image open once, shared by reference),
- the export registry (names, clients, draining),
- the NBD server (sockets and connections only),
- the control API, the metrics endpoint and the node configuration.

SIGTERM/SIGINT stop it (in-flight requests finish, images are flushed and
closed, locks released); SIGHUP rereads the configuration file and applies
the catalog's difference as adds and removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import resource
import signal
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bootcache.block.graph import NodeGraph
from bootcache.block.layer import chain_of
from bootcache.daemon import config as configmod
from bootcache.daemon.config import ConfigError, ExportSpec, NodeConfig
from bootcache.daemon.exports import (
    ACTIVE,
    ExportEntry,
    ExportError,
    ExportRegistry,
    default_name,
)
from bootcache.daemon.notify import notify, notify_reloading
from bootcache.daemon.prefetching import PrefetchSwitch
from bootcache.errors import BootcacheError
from bootcache.layers.chain import ChainPolicy, node_key
from bootcache.nbd.server import NBDServer

if TYPE_CHECKING:  # imported when started: aiohttp and prometheus_client are heavy
    from bootcache.daemon.control import ControlServer
    from bootcache.daemon.metrics import MetricsServer

log = logging.getLogger("bootcache.daemon")

#: Images opened at the same time while a catalog is loaded.
_OPEN_AT_ONCE = 16


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (an image is a file,
    a client a socket: a node with a thousand of each needs more than 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


def make_ssl_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            # Clients must present a certificate signed by this CA.
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise BootcacheError(f"TLS setup: {e}") from e
    return ctx


def policy_of(cfg: NodeConfig) -> ChainPolicy:
    """The backing policy: the configuration's folders, else the environment's."""
    policy = ChainPolicy.from_env()
    if cfg.backing_dirs is not None:
        policy.allowed_dirs = list(cfg.backing_dirs)
    policy.trusted = policy.trusted or cfg.trust_backing
    if cfg.readahead:
        policy.cache_readahead = cfg.readahead
    policy.remote_options = dict(cfg.remote)
    return policy


class NodeDaemon:
    """One node's images, exports and endpoints."""

    def __init__(self, cfg: NodeConfig, *, config_path: str | None = None,
                 pinned: frozenset[str] = frozenset()) -> None:
        """``pinned``: settings the command line fixed, which a reload of the
        file does not change (``prefetch`` after ``--no-prefetch``)."""
        cfg.check()
        self.cfg = cfg
        self.config_path = config_path
        self.pinned = pinned
        self.graph = NodeGraph()
        self.exports = ExportRegistry(self.graph, policy_of(cfg))
        self.server: NBDServer | None = None
        self.stopping = asyncio.Event()
        self._control: ControlServer | None = None
        self._metrics: MetricsServer | None = None
        self._links: set[str] = set()
        self.where: list[str] = []
        self.exports.on_open.append(self._link_caches)
        self.prefetch = PrefetchSwitch(cfg.prefetch)
        self.exports.on_open.append(lambda entry: self.prefetch.opened(entry.ref.layer))

    # -- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the catalog and start every endpoint; raise (closing what was
        opened) if any of it fails."""
        raise_file_limit()
        try:
            await self._add_catalog(self.cfg.exports)
            await self._listen()
        except BaseException:
            await self.close()
            raise

    async def _add_catalog(self, specs: list[ExportSpec]) -> None:
        """Open the catalog a few images at a time: opening waits mostly on
        fdatasync and reads, which overlap."""
        gate = asyncio.Semaphore(_OPEN_AT_ONCE)

        async def add(spec: ExportSpec) -> None:
            async with gate:
                await self._add_spec(spec)

        results = await asyncio.gather(*(add(s) for s in specs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _add_spec(self, spec: ExportSpec) -> ExportEntry:
        try:
            return await self.exports.add(spec.image, spec.name,
                                          read_only=spec.read_only or self.cfg.read_only)
        except ExportError as e:
            raise BootcacheError(str(e)) from e

    async def _listen(self) -> None:
        # Imported before the NBD socket appears: a client may connect the
        # moment it does, and importing aiohttp (about 0.1 s of CPU) would
        # block the loop serving it.
        from bootcache.daemon.control import ControlServer

        cfg = self.cfg
        if cfg.metrics is not None:
            from bootcache.daemon.metrics import MetricsServer
        ctx = make_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) \
            if cfg.tls_cert and cfg.tls_key else None
        self.server = server = NBDServer(self.exports, ssl_context=ctx,
                                         tls_required=cfg.tls_required)
        if cfg.socket:
            await server.listen_unix(cfg.socket, cfg.socket_mode)
            if cfg.socket_group:
                set_group(cfg.socket, cfg.socket_group)
            self.where.append(f"unix:{cfg.socket}")
        for host, port in cfg.listen:
            for addr in await server.listen_tcp(host, port):
                self.where.append(f"tcp:{addr[0]}:{addr[1]}")
        control_path = cfg.control_path()
        assert control_path is not None
        self._control = ControlServer(self)
        await self._control.start(control_path)
        self.where.append(f"control:{control_path}")
        if cfg.metrics is not None:
            self._metrics = MetricsServer(self)
            host, port = await self._metrics.start(*cfg.metrics)
            self.where.append(f"metrics:http://{host}:{port}/metrics")

    async def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or :attr:`stopping` is set), then close."""
        loop = asyncio.get_running_loop()
        handlers = [(signal.SIGTERM, self.stopping.set), (signal.SIGINT, self.stopping.set),
                    (signal.SIGHUP, self._reload_soon)]
        installed = []
        for sig, fn in handlers:
            try:
                loop.add_signal_handler(sig, fn)
                installed.append(sig)
            except (RuntimeError, ValueError):
                pass  # not the main thread (tests run the daemon in-process)
        try:
            await self.start()
            if ready is not None:
                ready(" ".join(self.where))
            notify("READY=1")  # systemd (Type=notify): clients may connect now
            await self.stopping.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            notify("STOPPING=1")
            await self.close()

    async def close(self) -> None:
        """Stop the endpoints, let requests finish, close every image."""
        if self.server is not None:
            await self.server.shutdown()
        if self._control is not None:
            await self._control.close()
            self._control = None
        if self._metrics is not None:
            await self._metrics.close()
            self._metrics = None
        await self.exports.close()
        for link in self._links:
            with contextlib.suppress(OSError):
                os.unlink(link)
        self._links.clear()

    # -- reload --------------------------------------------------------------------

    def _reload_soon(self) -> None:
        asyncio.get_running_loop().create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        notify_reloading()
        try:
            result = await self.reload()
            log.warning("reloaded %s: %s", self.config_path, result)
        except BootcacheError as e:
            log.error("reload refused, the catalog is unchanged: %s", e)
        finally:
            notify("READY=1")

    async def reload(self) -> dict[str, Any]:
        """Reread the configuration file and apply the catalog's difference.

        An invalid file changes nothing. Exports that left the catalog drain
        (removed once their last client leaves); new ones are added."""
        if not self.config_path:
            raise ExportError("this daemon was not started with --config", 409)
        try:
            new = configmod.load(self.config_path)
        except ConfigError as e:
            raise ExportError(str(e)) from e
        want = {}
        for spec in new.exports:
            name = spec.name or default_name(spec.image)
            want[name] = ExportSpec(spec.image, name, spec.read_only)
        have = {e.name: e for e in self.exports.entries() if e.state == ACTIVE}
        removed = sorted(n for n, e in have.items() if _spec_of(e) != want.get(n))
        added, errors = [], []
        for name in removed:
            if name in want and not have[name].connections:
                await self.exports.remove(name)  # changed, and unused: replace it now
            else:
                self.exports.drain(name)  # gone once its last client leaves
        for name, spec in want.items():
            if name in self.exports:
                if name in removed:
                    errors.append(f"export {name!r} changed but has clients: it drains "
                                  "now; reload again once they have left")
                continue
            try:
                await self._add_spec(spec)
                added.append(name)
            except BootcacheError as e:
                errors.append(str(e))
        for key in self.pinned:
            setattr(new, key, getattr(self.cfg, key))
        # Settings a reload applies to what is open, then to what opens later.
        applied = {}
        if new.prefetch != self.cfg.prefetch:
            applied["prefetch"] = await self.prefetch.set(
                new.prefetch, [node.layer for node in self.graph])
            self.cfg.prefetch = new.prefetch
        restart = sorted(k for k, v in new.settings().items()
                         if self.cfg.settings().get(k) != v)
        return {"added": added, "removed": removed, "errors": errors,
                "applied": applied, "needs_restart": restart}

    # -- publishing ----------------------------------------------------------------

    async def publish(self, image: str, dest: str, *, level: int | None = None
                      ) -> dict[str, Any]:
        """Publish the cache ``image`` this daemon serves to ``dest``: the lock
        that keeps other writers and strict readers off a served cache keeps
        ``bootcache cache publish`` off it too, so the daemon publishes it."""
        from bootcache.layers.cache import CacheLayer
        from bootcache.publish.publish import DEFAULT_LEVEL, publish_image

        key = node_key(image)

        async def not_open() -> Any:
            raise ExportError(f"{image}: not open in this daemon", 404)

        try:
            ref = await self.graph.acquire(key, not_open, writable=False)
        except BootcacheError as e:
            raise ExportError(str(e), 404 if isinstance(e, ExportError) else 409) from e
        try:
            cache = ref.layer
            if not isinstance(cache, CacheLayer):
                raise ExportError(f"{image}: not a cache image", 422)
            img = await cache.image_for_publishing()
            result = await publish_image(img, image, dest,
                                         level=DEFAULT_LEVEL if level is None else level)
        except ExportError:
            raise
        except BootcacheError as e:
            raise ExportError(str(e), 422) from e
        finally:
            await ref.release()
        log.warning("published %s to %s: %d clusters, %d bytes", image, dest,
                    result.clusters, result.artifact_bytes)
        return result.as_dict()

    # -- statistics ----------------------------------------------------------------

    def node_metrics(self) -> list[tuple[str, dict[str, Any]]]:
        """Each open image's own counters (``metrics()``), by node key."""
        return [(node.key, node.layer.metrics()) for node in self.graph]

    def node_stats(self, image: str) -> dict[str, Any] | None:
        key = node_key(image)
        for node in self.graph:
            if node.key == key:
                return node.layer.metrics()
        return None

    def export_stats(self, entry: ExportEntry) -> dict[str, Any]:
        c = entry.export.counters
        out = entry.describe()
        out.update(reads=c.reads, read_bytes=c.bytes, read_errors=c.errors,
                   read_seconds=c.seconds)
        chain = chain_of(entry.ref.layer)
        out["caches"] = {node.key: node.layer.metrics() for node in self.graph
                         if node.layer.self_writing and node.layer in chain}
        return out

    def _link_caches(self, entry: ExportEntry) -> None:
        """Leave ``CACHE.ctl`` beside each cache image: a link to the control
        socket, by which ``bootcache cache stats CACHE`` finds this daemon."""
        control = self.cfg.control_path()
        if control is None:
            return
        for layer in chain_of(entry.ref.layer):
            if not layer.self_writing or "://" in layer.name:
                continue
            link = node_key(layer.name) + ".ctl"
            if link in self._links:
                continue
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(link)
                os.symlink(os.path.abspath(control), link)
                self._links.add(link)
            except OSError as e:
                log.debug("%s: no control link: %s", link, e)


def _spec_of(entry: ExportEntry) -> ExportSpec:
    return ExportSpec(entry.image, entry.name, entry.read_only)


def set_group(path: str, group: str) -> None:
    """Give the socket to ``group`` (a name or a number)."""
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise BootcacheError(f"socket group {group!r}: no such group") from None
    os.chown(path, -1, gid)


__all__ = ["NodeDaemon", "make_ssl_context", "raise_file_limit"]
