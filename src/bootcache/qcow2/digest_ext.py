"""The published-cache digest extension (docs/spec/cache-image.md, section 13).

A published cache is one qcow2 file that vouches for itself: this header
extension holds the file's length, a SHA-256 over the whole file (with the
digest's own 32 bytes read as zeros) and a SHA-256 over the guest content of
its data clusters. All integers are big endian.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from bootcache.errors import ImageFormatError

#: Header extension type: the ASCII bytes "BCPD" (bootcache published digest).
EXT_DIGEST = 0x42435044
VERSION = 1

# version, flags, file_length, data_clusters, file_sha256, content_sha256
_LAYOUT = struct.Struct(">IIQQ32s32s")
LENGTH = _LAYOUT.size  # 88
#: Where file_sha256 lies inside the extension's data.
FILE_SHA256_AT = 24
#: flags bit 0: every compressed cluster is one zstd frame carrying a content
#: checksum, so a reader can verify the content as it decompresses instead of
#: hashing it all again (spec section 14.2).
FLAG_FRAME_CHECKSUMS = 1


@dataclass
class Digest:
    """What a published cache says about itself."""

    file_length: int
    data_clusters: int
    file_sha256: bytes = bytes(32)
    content_sha256: bytes = bytes(32)
    flags: int = 0

    def encode(self) -> bytes:
        return _LAYOUT.pack(VERSION, self.flags, self.file_length, self.data_clusters,
                            self.file_sha256, self.content_sha256)

    @classmethod
    def decode(cls, data: bytes) -> Digest:
        if len(data) < 4:
            raise ImageFormatError(f"digest extension: {len(data)} bytes, need {LENGTH}")
        version = struct.unpack_from(">I", data)[0]
        if version != VERSION:
            raise ImageFormatError(f"digest extension: unsupported version {version}")
        if len(data) < LENGTH:
            raise ImageFormatError(f"digest extension: {len(data)} bytes, need {LENGTH}")
        _, flags, length, clusters, file_sha, content_sha = _LAYOUT.unpack_from(data)
        return cls(file_length=length, data_clusters=clusters, file_sha256=file_sha,
                   content_sha256=content_sha, flags=flags)


class ContentHasher:
    """content_sha256: for each data cluster in increasing guest order, its guest
    offset (8 bytes) then its whole cluster of guest content."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, guest_offset: int, cluster: bytes | bytearray | memoryview) -> None:
        self._h.update(guest_offset.to_bytes(8, "big"))
        self._h.update(cluster)

    def digest(self) -> bytes:
        return self._h.digest()
