"""``bootcache vm``: hot-plug a disk backed by a cache export into a running QEMU.

    bootcache vm attach --qmp SOCK --export NAME [--socket S] --overlay PATH --id ID
                        [--bus BUS] [--reconnect-delay SECONDS]
    bootcache vm detach --qmp SOCK --id ID [--timeout SECONDS]

The QMP work lives in ``bootcache.vm``; it is imported inside each command
so that ``bootcache --help`` does not load the QMP library.
"""

from __future__ import annotations

import asyncio

import click

DEFAULT_SOCKET = "/run/bootcache.sock"


@click.group()
def vm() -> None:
    """Hot-plug disks backed by a cache export into running VMs (QMP)."""


@vm.command()
@click.option("--qmp", "qmp_socket", required=True, metavar="PATH",
              help="The VM's QMP socket (-qmp unix:PATH,server=on,wait=off).")
@click.option("--export", required=True, metavar="NAME", help="Export name on the daemon.")
@click.option("--socket", "nbd_socket", default=DEFAULT_SOCKET, show_default=True,
              metavar="PATH", help="The UNIX socket `bootcache serve` listens on.")
@click.option("--overlay", required=True, metavar="PATH",
              help="The VM's writable qcow2 over the export (created if missing).")
@click.option("--id", "device_id", required=True, help="Device id; nodes are ID-nbd, "
              "ID-file, ID-overlay.")
@click.option("--bus", help="Bus to plug into (on q35: a pcie-root-port id).")
@click.option("--reconnect-delay", type=click.IntRange(min=0), default=None, metavar="SECONDS",
              help="How long QEMU holds I/O while the daemon is away [default: 30].")
def attach(qmp_socket: str, export: str, nbd_socket: str, overlay: str, device_id: str,
           bus: str | None, reconnect_delay: int | None) -> None:
    """Add a virtio disk: overlay (local) -> cache export (NBD), by QMP."""
    from bootcache.vm.hotplug import DEFAULT_RECONNECT_DELAY, DiskSpec, attach
    from bootcache.vm.monitor import Monitor

    spec = DiskSpec(device_id=device_id, export=export, socket=nbd_socket, overlay=overlay,
                    bus=bus, reconnect_delay=(DEFAULT_RECONNECT_DELAY if reconnect_delay is None
                                              else reconnect_delay))

    async def run() -> None:
        async with await Monitor.open(qmp_socket) as monitor:
            await attach(monitor, spec)

    asyncio.run(run())
    click.echo(f"attached {device_id}: {overlay} over export {export!r} on {nbd_socket}",
               err=True)


@vm.command()
@click.option("--qmp", "qmp_socket", required=True, metavar="PATH", help="The VM's QMP socket.")
@click.option("--id", "device_id", required=True, help="Device id given to attach.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="How long to wait for the guest to release the device [default: 30].")
def detach(qmp_socket: str, device_id: str, timeout: float | None) -> None:
    """Unplug the disk and delete its block nodes."""
    from bootcache.vm.hotplug import DEFAULT_DETACH_TIMEOUT, detach
    from bootcache.vm.monitor import Monitor

    async def run() -> None:
        async with await Monitor.open(qmp_socket) as monitor:
            await detach(monitor, device_id,
                         timeout=DEFAULT_DETACH_TIMEOUT if timeout is None else timeout)

    asyncio.run(run())
    click.echo(f"detached {device_id}", err=True)


COMMANDS = [vm]
