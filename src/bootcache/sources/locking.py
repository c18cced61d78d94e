"""Image locks compatible with QEMU's file-posix driver.

QEMU takes open-file-description (OFD) byte-range locks on an image:
for every permission it holds it read-locks byte ``100 + bit``, and for
every permission it does not let others hold it read-locks byte
``200 + bit``. Before taking permissions it checks, with a write-lock
probe, that nobody holds a permission it refuses to share and that nobody
refuses to share a permission it wants. Using the same bytes makes
bootcache and qemu-img/qemu-io/QEMU refuse each other exactly as two QEMU
processes would.
"""

from __future__ import annotations

import fcntl
import os
import struct
from enum import IntFlag

from bootcache.errors import ImageLockedError

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock on Linux/x86_64 and aarch64: short type, short whence,
# off_t start, off_t len, pid_t pid (+ padding).
_FLOCK = struct.Struct("hhqqi4x")

PERM_BASE = 100
SHARED_PERM_BASE = 200


class Perm(IntFlag):
    """Block-layer permissions, numbered as QEMU numbers them."""

    CONSISTENT_READ = 1 << 0
    WRITE = 1 << 1
    WRITE_UNCHANGED = 1 << 2
    RESIZE = 1 << 3


ALL_PERMS = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
_NAMES = {Perm.CONSISTENT_READ: "consistent read", Perm.WRITE: "write",
          Perm.WRITE_UNCHANGED: "write unchanged", Perm.RESIZE: "resize"}


def _bits(perms: Perm) -> list[Perm]:
    return [p for p in (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE)
            if p & perms]


def _byte(base: int, perm: Perm) -> int:
    return base + perm.bit_length() - 1


def _setlk(fd: int, ltype: int, start: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0))


def _conflicts(fd: int, start: int) -> bool:
    """True when another open file description holds a lock on ``start``."""
    res = fcntl.fcntl(fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0))
    return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)


# A daemon shares each image between its own exports, so a conflict is
# always another process: say how to find it and what to do instead.
_WHAT_TO_DO = ("; `fuser -v {path}` names it. Stop it, or, if it is a bootcache daemon, "
               "export the image from that daemon (`bootcache ctl add`)")


def lock_image(fd: int, path: str, perms: Perm, shared: Perm) -> None:
    """Take QEMU-compatible locks for holding ``perms`` and sharing ``shared``.

    Raises ImageLockedError, naming the permission, when another process's
    locks conflict. On failure no lock is left held.
    """
    unshared = ALL_PERMS & ~shared
    try:
        for p in _bits(perms):
            _setlk(fd, fcntl.F_RDLCK, _byte(PERM_BASE, p))
        for p in _bits(unshared):
            _setlk(fd, fcntl.F_RDLCK, _byte(SHARED_PERM_BASE, p))
    except OSError as e:
        unlock_image(fd)
        raise ImageLockedError(
            f"{path}: failed to lock image ({e.strerror}); is another process using it?") from e
    for p in _bits(perms):
        if _conflicts(fd, _byte(SHARED_PERM_BASE, p)):
            unlock_image(fd)
            raise ImageLockedError(
                f'{path}: failed to get "{_NAMES[p]}" lock: another process '
                "(QEMU, qemu-img or bootcache) is using the image and does not share it"
                + _WHAT_TO_DO.format(path=path))
    for p in _bits(unshared):
        if _conflicts(fd, _byte(PERM_BASE, p)):
            unlock_image(fd)
            raise ImageLockedError(
                f'{path}: failed to get shared "{_NAMES[p]}" lock: another process '
                "(QEMU, qemu-img or bootcache) holds it" + _WHAT_TO_DO.format(path=path))


def unlock_image(fd: int) -> None:
    """Drop every lock byte bootcache may hold on ``fd``."""
    for base in (PERM_BASE, SHARED_PERM_BASE):
        try:
            fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, base, 4, 0))
        except OSError:
            pass
