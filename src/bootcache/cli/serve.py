"""``bootcache serve``: export images over NBD on a UNIX socket and/or TCP.

    bootcache serve [--socket PATH] [--listen HOST:PORT] [--read-only]
                    [--tls-cert PEM --tls-key PEM [--tls-ca PEM] [--tls-required]]
                    IMAGE[=NAME] ...

Each IMAGE is exported as NAME (default: its file name without ``.qcow2``).
SIGTERM or SIGINT: stop accepting, finish in-flight requests, flush, close
the images (releasing their locks), exit 0.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click

from bootcache.errors import BootcacheError, UnsupportedFeatureError
from bootcache.layers.base import BlockLayer
from bootcache.layers.cache import caches_in
from bootcache.layers.chain import ChainPolicy
from bootcache.layers.raw import RawLayer
from bootcache.nbd.server import NBDServer
from bootcache.sources.file import FileSource

QCOW2_MAGIC = b"QFI\xfb"


def _qcow2_opener() -> Callable[..., Awaitable[BlockLayer]] | None:
    """The qcow2 engine's chain opener, once that engine exists."""
    try:
        chain = importlib.import_module("bootcache.layers.chain")
    except ImportError:
        return None
    opener = getattr(chain, "open_layer", None)
    return opener if callable(opener) else None


async def open_image(path: str, *, writable: bool,
                     policy: ChainPolicy | None = None) -> BlockLayer:
    """Open one image as a layer: qcow2 through the chain opener, else raw."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BootcacheError(f"{path}: cannot open: {e.strerror}") from e
    if magic == QCOW2_MAGIC:
        opener = _qcow2_opener()
        if opener is None:
            raise UnsupportedFeatureError(f"{path}: qcow2 images need the qcow2 engine")
        layer: BlockLayer = await opener(path, writable=writable,
                                         policy=policy or ChainPolicy.from_env())
        return layer
    return await RawLayer.open(FileSource(path, writable=writable), read_only=not writable)


def parse_image_arg(arg: str) -> tuple[str, str]:
    """IMAGE[=NAME] -> (path, export name)."""
    path, sep, name = arg.partition("=")
    if not sep:
        name = os.path.basename(path)
        name = name.removesuffix(".qcow2")
    if not path or not name:
        raise click.BadParameter(f"{arg!r}: expected IMAGE[=NAME]")
    return path, name


def parse_listen(arg: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [addr]:port) -> (host, port)."""
    host, sep, port = arg.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{arg!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


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


async def run_server(images: list[tuple[str, str]], *, socket_path: str | None,
                     socket_mode: int, listen: list[tuple[str, int]], read_only: bool,
                     ssl_context: ssl.SSLContext | None, tls_required: bool,
                     ready: Callable[[str], None] | None = None,
                     stop: asyncio.Event | None = None,
                     policy: ChainPolicy | None = None) -> None:
    """Open the images, serve them until SIGTERM/SIGINT (or ``stop``), shut down."""
    layers: dict[str, BlockLayer] = {}
    try:
        for path, name in images:
            if name in layers:
                raise BootcacheError(f"export name {name!r} given twice")
            layers[name] = await open_image(path, writable=not read_only, policy=policy)
    except BaseException:
        for layer in layers.values():
            await layer.close()
        raise
    for layer in layers.values():
        for cache in caches_in(layer):
            cache.start_publishing()  # live counters for `bootcache cache stats`
    server = NBDServer(layers, ssl_context=ssl_context, tls_required=tls_required)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (RuntimeError, ValueError):
            pass  # not the main thread (tests run the server in-process)
    try:
        where = []
        if socket_path:
            await server.listen_unix(socket_path, socket_mode)
            where.append(f"unix:{socket_path}")
        for host, port in listen:
            for addr in await server.listen_tcp(host, port):
                where.append(f"tcp:{addr[0]}:{addr[1]}")
        if ready is not None:
            ready(" ".join(where))
        await stop.wait()
    finally:
        await server.shutdown()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


@click.command("serve")
@click.option("--socket", "socket_path", metavar="PATH", help="Listen on this UNIX socket.")
@click.option("--socket-mode", default="0600", show_default=True,
              help="Permissions of the UNIX socket (octal).")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Listen on TCP (repeatable; port 0 picks a free port).")
@click.option("--read-only", is_flag=True, help="Export every image read-only.")
@click.option("--tls-cert", metavar="PEM", help="Server certificate (enables STARTTLS).")
@click.option("--tls-key", metavar="PEM", help="Private key of --tls-cert.")
@click.option("--tls-ca", metavar="PEM", help="Require client certificates from this CA.")
@click.option("--tls-required", is_flag=True, help="Refuse clients that do not use TLS.")
@click.option("--readahead", metavar="SIZE", default="0",
              help="Cache exports: also fetch this much beyond each miss (e.g. 256K).")
@click.option("-v", "--verbose", count=True, help="Log more (-vv for debug).")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE[=NAME]...")
def serve(socket_path: str | None, socket_mode: str, listen: tuple[str, ...],
          read_only: bool, tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
          tls_required: bool, readahead: str, verbose: int, images: tuple[str, ...]) -> None:
    """Serve IMAGEs over NBD until SIGTERM."""
    if not socket_path and not listen:
        raise click.UsageError("give --socket PATH and/or --listen HOST:PORT")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_required and not tls_cert:
        raise click.UsageError("--tls-required needs --tls-cert and --tls-key")
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        raise click.BadParameter(f"{socket_mode!r} is not an octal mode") from None
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
                        format="bootcache serve: %(message)s")
    parsed = [parse_image_arg(a) for a in images]
    policy = ChainPolicy.from_env()
    if readahead != "0":
        from bootcache.cli.images import parse_size

        policy.cache_readahead = parse_size(readahead)
    addrs = [parse_listen(a) for a in listen]
    ctx = make_ssl_context(tls_cert, tls_key, tls_ca) if tls_cert and tls_key else None

    def ready(where: str) -> None:
        names = ", ".join(name for _, name in parsed)
        click.echo(f"bootcache serve: serving {names} on {where}", err=True)

    kwargs: dict[str, Any] = {}
    factory = _loop_factory()
    if factory is not None:
        kwargs["loop_factory"] = factory
    with asyncio.Runner(**kwargs) as runner:
        runner.run(run_server(parsed, socket_path=socket_path, socket_mode=mode,
                              listen=addrs, read_only=read_only, ssl_context=ctx,
                              tls_required=tls_required, ready=ready, policy=policy))


def main() -> None:
    """Entry point for ``python -m bootcache.cli.serve``."""
    try:
        serve.main(standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except BootcacheError as e:
        click.echo(f"bootcache: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
