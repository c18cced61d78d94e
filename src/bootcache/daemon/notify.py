"""systemd service notifications (``sd_notify``) without libsystemd.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent
to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; a leading ``@`` names a
socket in the abstract namespace.  The daemon uses::

    notify("READY=1")       # once it accepts connections
    notify("RELOADING=1")   # on SIGHUP, before re-reading the config
    notify("READY=1")       # after the reload
    notify("STOPPING=1")    # at shutdown

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    """$NOTIFY_SOCKET -> an address for sendto(), or None if unusable."""
    if value.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd >= 253 may also hand out vsock: addresses (VMs); we serve on hosts.
    return None


def notify(state: str) -> bool:
    """Send ``state`` to the service manager.

    Returns True once the datagram was sent, False when there is no
    ``$NOTIFY_SOCKET`` (not under systemd, or not ``Type=notify``) or it
    could not be reached.  A failure is logged, not raised: a daemon that
    serves but cannot tell systemd is better than one that dies for it.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r: unsupported address, not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.warning("notify %r to %s failed: %s", state, value, e)
        return False
    return True


def notify_reloading() -> bool:
    """``RELOADING=1`` with the timestamp systemd >= 253 wants alongside it.

    Older systemd ignores the unknown ``MONOTONIC_USEC`` line; newer ones use
    it to tell this reload from an earlier one (``Type=notify-reload``).
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
