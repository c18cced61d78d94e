"""``bootcache serve``: run the node daemon (NBD exports, control socket, metrics).

    bootcache serve [--config node.toml] [--socket PATH] [--listen HOST:PORT]
                    [--control PATH] [--metrics HOST:PORT] [--read-only]
                    [--socket-mode MODE] [--socket-group GROUP]
                    [--tls-cert PEM --tls-key PEM [--tls-ca PEM] [--tls-required]]
                    [IMAGE[=NAME] ...]

Each IMAGE is exported as NAME (default: its file name without ``.qcow2``);
images the exports share (a cache under several overlays) are opened once.
SIGTERM or SIGINT: stop accepting, finish in-flight requests, flush, close
the images (releasing their locks), exit 0. SIGHUP: reread ``--config``.
The daemon itself is ``bootcache.daemon.service``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import click

from bootcache.cli.exits import run_command
from bootcache.daemon import config as configmod
from bootcache.daemon.config import ExportSpec, NodeConfig


def parse_image_arg(arg: str) -> tuple[str, str]:
    """IMAGE[=NAME] -> (path, export name)."""
    from bootcache.daemon.exports import default_name

    path, sep, name = arg.partition("=")
    if not sep:
        name = default_name(path)
    if not path or not name:
        raise click.BadParameter(f"{arg!r}: expected IMAGE[=NAME]")
    return path, name


def _option(fn: Callable[[str], Any], value: str, what: str) -> Any:
    try:
        return fn(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=what) from None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


@click.command("serve")
@click.option("--config", "config_path", metavar="TOML",
              help="Node configuration file (reread on SIGHUP).")
@click.option("--socket", "socket_path", metavar="PATH", help="Listen on this UNIX socket.")
@click.option("--socket-mode", default=None, help="Permissions of the UNIX socket (octal; "
              "default 0600).")
@click.option("--socket-group", default=None, metavar="GROUP",
              help="Group of the UNIX socket (e.g. the group QEMU runs as).")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Listen on TCP (repeatable; port 0 picks a free port).")
@click.option("--control", "control_path", metavar="PATH",
              help="Control socket (default: the --socket path plus .ctl).")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here.")
@click.option("--read-only", is_flag=True, help="Export every image read-only.")
@click.option("--tls-cert", metavar="PEM", help="Server certificate (enables STARTTLS).")
@click.option("--tls-key", metavar="PEM", help="Private key of --tls-cert.")
@click.option("--tls-ca", metavar="PEM", help="Require client certificates from this CA.")
@click.option("--tls-required", is_flag=True, help="Refuse clients that do not use TLS.")
@click.option("--readahead", metavar="SIZE", default=None,
              help="Cache exports: also fetch this much beyond each miss (e.g. 256K).")
@click.option("--no-prefetch", is_flag=True,
              help="Caches do not prefetch the clusters their boot profile names.")
@click.option("--remote-option", "remote_options", multiple=True, metavar="KEY=VALUE",
              help="Remote bases: deadline, timeout, retries, ... (repeatable).")
@click.option("-v", "--verbose", count=True, help="Log more (-vv for debug).")
@click.argument("images", nargs=-1, metavar="[IMAGE[=NAME]]...")
def serve(config_path: str | None, socket_path: str | None, socket_mode: str | None,
          socket_group: str | None, listen: tuple[str, ...], control_path: str | None,
          metrics: str | None, read_only: bool, tls_cert: str | None, tls_key: str | None,
          tls_ca: str | None, tls_required: bool, readahead: str | None,
          no_prefetch: bool, remote_options: tuple[str, ...], verbose: int,
          images: tuple[str, ...]) -> None:
    """Serve IMAGEs (and the catalog of --config) over NBD until SIGTERM."""
    cfg = configmod.load(config_path) if config_path else NodeConfig()
    # Command-line options override the file's.
    if socket_path:
        cfg.socket = socket_path
    if socket_mode is not None:
        cfg.socket_mode = _option(lambda v: int(v, 8), socket_mode, "--socket-mode")
    if socket_group:
        cfg.socket_group = socket_group
    if listen:
        cfg.listen = [_option(configmod.parse_address, a, "--listen") for a in listen]
    if control_path:
        cfg.control = control_path
    if metrics:
        cfg.metrics = _option(configmod.parse_address, metrics, "--metrics")
    if tls_cert or tls_key:
        cfg.tls_cert, cfg.tls_key = tls_cert, tls_key
    if tls_ca:
        cfg.tls_ca = tls_ca
    cfg.tls_required = cfg.tls_required or tls_required
    cfg.read_only = read_only
    if readahead is not None:
        cfg.readahead = _option(configmod.parse_size, readahead, "--readahead")
    if no_prefetch:
        cfg.prefetch = False
    for opt in remote_options:
        key, sep, value = opt.partition("=")
        if not sep:
            raise click.BadParameter(f"{opt!r}: expected KEY=VALUE", param_hint="--remote-option")
        cfg.remote[key] = value
    for arg in images:
        path, name = parse_image_arg(arg)
        cfg.exports.append(ExportSpec(path, name))
    try:
        cfg.check()
    except configmod.ConfigError as e:
        raise click.UsageError(str(e)) from None
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
                        format="bootcache serve: %(message)s")


    def ready(where: str) -> None:
        names = ", ".join(e.name for e in daemon.exports.entries()) or "no exports yet"
        click.echo(f"bootcache serve: serving {names} on {where}", err=True)

    kwargs: dict[str, Any] = {}
    factory = _loop_factory()
    if factory is not None:
        kwargs["loop_factory"] = factory
    with asyncio.Runner(**kwargs) as runner:
        daemon = runner.run(_make(cfg, config_path,
                                  frozenset({"prefetch"}) if no_prefetch else frozenset()))
        runner.run(daemon.run(ready))


async def _make(cfg: NodeConfig, config_path: str | None, pinned: frozenset[str]) -> Any:
    from bootcache.daemon.service import NodeDaemon

    return NodeDaemon(cfg, config_path=config_path, pinned=pinned)


def main() -> None:
    """Entry point for ``python -m bootcache.cli.serve``."""
    run_command(serve)

if __name__ == "__main__":
    main()
