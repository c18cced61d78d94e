"""Upload a local file to ``s3://bucket/key`` with the S3 source's client.

Small files go in one PutObject; larger ones as a multipart upload whose
parts are sent a few at a time, each retried under the remote options'
deadline. The object appears whole or not at all: S3 makes a multipart
object visible only at CompleteMultipartUpload, and a failed upload is
aborted so its parts do not linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from bootcache.errors import SourceError
from bootcache.sources.resilience import RemoteOptions, Resilience
from bootcache.sources.s3 import FAILURES, open_client, parse_s3_url, translate_error

#: Part size: S3's minimum is 5 MiB; 16 MiB keeps requests few and memory small.
PART_SIZE = 16 << 20
_PARTS_IN_FLIGHT = 4


async def upload_file(path: str, url: str, options: RemoteOptions | None = None,
                      **client_options: Any) -> str:
    """Upload ``path`` to ``url``; returns the new object's ETag."""
    opts = options or RemoteOptions()
    bucket, key = parse_s3_url(url)
    size = os.path.getsize(path)
    async with contextlib.AsyncExitStack() as stack:
        client = await open_client(url, stack, opts, **client_options)
        calls = Resilience(url, opts)

        async def request(what: str, op: str, **args: Any) -> Any:
            async def attempt() -> Any:
                try:
                    return await getattr(client, op)(**args)
                except FAILURES as e:
                    raise translate_error(url, what, e) from e
            return await calls.call(what, attempt)

        with open(path, "rb") as f:
            if size <= PART_SIZE:
                r = await request("PutObject", "put_object", Bucket=bucket, Key=key,
                                  Body=f.read())
                return str(r.get("ETag", ""))
            up = await request("CreateMultipartUpload", "create_multipart_upload",
                               Bucket=bucket, Key=key)
            upload_id = up["UploadId"]
            try:
                parts = await _send_parts(f.fileno(), size, request, bucket, key, upload_id)
                r = await request("CompleteMultipartUpload", "complete_multipart_upload",
                                  Bucket=bucket, Key=key, UploadId=upload_id,
                                  MultipartUpload={"Parts": parts})
                return str(r.get("ETag", ""))
            except BaseException:
                with contextlib.suppress(SourceError, *FAILURES):
                    await client.abort_multipart_upload(Bucket=bucket, Key=key,
                                                        UploadId=upload_id)
                raise


async def _send_parts(fd: int, size: int, request: Any, bucket: str, key: str,
                      upload_id: str) -> list[dict[str, Any]]:
    slots = asyncio.Semaphore(_PARTS_IN_FLIGHT)

    async def send(number: int, offset: int) -> dict[str, Any]:
        async with slots:
            body = os.pread(fd, min(PART_SIZE, size - offset), offset)
            r = await request(f"UploadPart {number}", "upload_part", Bucket=bucket, Key=key,
                              UploadId=upload_id, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": r["ETag"]}

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(send(n + 1, off))
                     for n, off in enumerate(range(0, size, PART_SIZE))]
    except ExceptionGroup as eg:
        raise eg.exceptions[0] from None  # the first failure, not a group of them
    return [t.result() for t in tasks]
