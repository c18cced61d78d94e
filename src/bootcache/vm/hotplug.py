"""Attach and detach a virtio disk whose backing is a bootcache cache export.

    attach:  blockdev-add nbd (ID-nbd)  ->  blockdev-add file (ID-file)
             ->  blockdev-add qcow2 (ID-overlay: file ID-file, backing ID-nbd)
             ->  device_add virtio-blk-pci (id ID, drive ID-overlay)
    detach:  device_del ID, wait for DEVICE_DELETED, blockdev-del the three nodes

Everything is checked before the first change; a step that fails undoes
the steps before it, so a refused attach leaves the VM as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from qemu.qmp import Message

from bootcache.vm.export import create_overlay, probe_export
from bootcache.vm.monitor import HotplugError, Monitor

# QEMU retries a lost NBD connection at growing intervals (about 1, 2, 4, 8,
# 16 s) and holds guest I/O meanwhile for up to reconnect-delay seconds. 30 s
# covers a `bootcache serve` restart (it reopens the cache and listens in
# well under a second) plus the retry interval in force when it comes back,
# while a daemon that is really gone still turns into an I/O error the guest
# sees within half a minute rather than a hang.
DEFAULT_RECONNECT_DELAY = 30
# Without a guest (or with one that honours the request) PCIe unplug is
# done in milliseconds; a guest that refuses never sends it at all.
DEFAULT_DETACH_TIMEOUT = 30.0
DEVICE_DRIVER = "virtio-blk-pci"


@dataclass(frozen=True)
class Nodes:
    """The block nodes of one hot-plugged disk, named after its device id."""

    nbd: str
    file: str
    overlay: str

    @classmethod
    def of(cls, device_id: str) -> Nodes:
        return cls(nbd=f"{device_id}-nbd", file=f"{device_id}-file",
                   overlay=f"{device_id}-overlay")

    def top_down(self) -> list[str]:
        """The order they can be deleted in: users before what they use."""
        return [self.overlay, self.file, self.nbd]


@dataclass(frozen=True)
class DiskSpec:
    device_id: str
    export: str
    socket: str
    overlay: str
    bus: str | None = None
    reconnect_delay: int = DEFAULT_RECONNECT_DELAY


def nbd_node(spec: DiskSpec, name: str) -> dict[str, Any]:
    return {"driver": "nbd", "node-name": name,
            "server": {"type": "unix", "path": spec.socket},
            "export": spec.export, "read-only": True,
            "reconnect-delay": spec.reconnect_delay}


def file_node(spec: DiskSpec, name: str) -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": spec.overlay}


def overlay_node(nodes: Nodes) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": nodes.overlay, "file": nodes.file,
            "backing": nodes.nbd}


def device(spec: DiskSpec, nodes: Nodes) -> dict[str, Any]:
    args: dict[str, Any] = {"driver": DEVICE_DRIVER, "id": spec.device_id,
                            "drive": nodes.overlay}
    if spec.bus:
        args["bus"] = spec.bus
    return args


async def check_id_free(monitor: Monitor, device_id: str) -> None:
    nodes = Nodes.of(device_id)
    if device_id in await monitor.device_ids():
        raise HotplugError(f"a device with id {device_id!r} already exists")
    taken = (await monitor.node_names() | await monitor.block_backends()) & {
        device_id, *nodes.top_down()}
    if taken:
        raise HotplugError(f"id {device_id!r}: block node(s) {', '.join(sorted(taken))} "
                           "already exist")


async def attach(monitor: Monitor, spec: DiskSpec) -> Nodes:
    """Hot-plug the disk; on any failure undo every change and raise."""
    nodes = Nodes.of(spec.device_id)
    await check_id_free(monitor, spec.device_id)
    size = await probe_export(spec.socket, spec.export)
    made_overlay = not os.path.exists(spec.overlay)
    if made_overlay:
        create_overlay(spec.overlay, spec.socket, spec.export, size)
    added: list[str] = []
    try:
        for node in (nbd_node(spec, nodes.nbd), file_node(spec, nodes.file),
                     overlay_node(nodes)):
            await monitor.execute("blockdev-add", node)
            added.append(node["node-name"])
        await add_device(monitor, spec, nodes)
    except BaseException as e:
        problems = await _delete_nodes(monitor, reversed(added))
        if made_overlay:
            os.unlink(spec.overlay)
        if problems and isinstance(e, HotplugError):
            raise HotplugError(f"{e}; and undoing it: {'; '.join(problems)}") from e
        raise
    return nodes


async def add_device(monitor: Monitor, spec: DiskSpec, nodes: Nodes) -> None:
    try:
        await monitor.execute("device_add", device(spec, nodes))
    except HotplugError as e:
        if spec.bus is None and "hotplug" in str(e):
            raise HotplugError(f"{e} (q35's root bus takes no hot-plug: give --bus with the "
                               "id of a pcie-root-port)") from e
        raise


async def detach(monitor: Monitor, device_id: str, *,
                 timeout: float = DEFAULT_DETACH_TIMEOUT) -> None:
    """Unplug the device, wait until QEMU has released it, delete its nodes.

    A detach interrupted after the device went (nodes left behind) can be
    run again: it deletes whichever of the nodes still exist.
    """
    nodes = Nodes.of(device_id)
    present = await monitor.node_names()
    if device_id in await monitor.device_ids():
        with monitor.listener("DEVICE_DELETED", lambda ev: _names_device(ev, device_id)) as deleted:
            await monitor.execute("device_del", {"id": device_id})
            try:
                await deleted.wait(timeout)
            except TimeoutError:
                raise HotplugError(
                    f"{device_id}: the device was not released within {timeout:g} s (the "
                    "guest has not acknowledged the unplug); its nodes are left in place, "
                    "run detach again once it is gone") from None
    elif not present & set(nodes.top_down()):
        raise HotplugError(f"no disk {device_id!r} is attached (no such device or nodes)")
    problems = await _delete_nodes(monitor, (n for n in nodes.top_down() if n in present))
    if problems:
        raise HotplugError("; ".join(problems))


def _names_device(event: Message, device_id: str) -> bool:
    # The virtio proxy's backend child is deleted too, with a path but no id.
    data = event["data"]
    return isinstance(data, dict) and data.get("device") == device_id


async def _delete_nodes(monitor: Monitor, names: Iterable[str]) -> list[str]:
    """blockdev-del each, in the order given; the failures, as messages."""
    problems = []
    for name in names:
        try:
            await monitor.execute("blockdev-del", {"node-name": name})
        except HotplugError as e:
            problems.append(str(e))
    return problems
