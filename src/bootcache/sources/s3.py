"""S3 byte source: ``s3://bucket/key`` read by ranged GetObject through aiobotocore.

Endpoint, region and credentials come from the same places the AWS SDKs
look: AWS_ENDPOINT_URL(_S3), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws/config + credentials (also
endpoint_url and s3.addressing_style there), container and instance
roles. botocore itself reads only AWS_DEFAULT_REGION, while the other SDKs
prefer AWS_REGION, so AWS_REGION is honoured first here. Explicit options
(``endpoint_url``, ``region``, ``profile``) override everything.

Retries are ours (see resilience.py), not botocore's, so a dead endpoint
obeys one deadline. Every read carries If-Match with the ETag seen at open:
a replaced object fails with SourceChangedError, never a mix of versions.

Metadata (HeadObject) goes through aiobotocore; ranged reads go through
libcurl (sources/curl_transport.py) on a presigned GetObject URL that is
signed by the same client and reused for a minute: signing costs more CPU
than the rest of a request, and Range and If-Match need not be signed.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Any

import aiohttp
import botocore.exceptions  # type: ignore[import-untyped]
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from botocore import UNSIGNED

from bootcache.errors import SourceError
from bootcache.sources.curl_transport import (
    CurlSettings,
    CurlTransport,
    Reply,
    TransferFailed,
    proxy_from_environment,
)
from bootcache.sources.resilience import (
    RemoteOptions,
    RemoteSource,
    SourceChangedError,
    TransientError,
    check_ranged_reply,
    check_status,
    describe,
)

_ERROR_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
# A presigned read URL is valid this long and re-signed when this old.
_URL_EXPIRES = 900
_URL_REUSE = 60.0
# Error codes S3 and compatible stores use for "slow down / try again".
_TRANSIENT_CODES = frozenset({
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "Throttling",
    "ThrottlingException", "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
    "TooManyRequestsException", "PriorRequestNotComplete", "ServerBusy",
})


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` (key taken literally, like the AWS CLI)."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url}: not an s3:// URL")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ValueError(f"{url}: expected s3://bucket/key")
    return bucket, key


def _translate(name: str, what: str, e: Exception) -> SourceError:
    """Map a botocore/aiohttp failure to transient (retry) or permanent."""
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        text = f"{name}: {what}: {code or status} {err.get('Message', '')}".rstrip()
        if status == 412 or code == "PreconditionFailed":
            return SourceChangedError(f"{text}: the object changed since it was opened")
        if code in _TRANSIENT_CODES or status in (408, 429) or status >= 500:
            return TransientError(text)
        return SourceError(text)
    if isinstance(e, botocore.exceptions.NoCredentialsError
                  | botocore.exceptions.PartialCredentialsError
                  | botocore.exceptions.NoRegionError
                  | botocore.exceptions.SSLError
                  | botocore.exceptions.ParamValidationError):
        return SourceError(f"{name}: {what}: {describe(e)}")
    # Connection refused/reset/closed, timeouts, short bodies.
    return TransientError(f"{name}: {what}: {describe(e)}")


_FAILURES = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
             aiohttp.ClientError)


async def open_client(url: str, stack: contextlib.AsyncExitStack, options: RemoteOptions, *,
                      endpoint_url: str | None = None, region: str | None = None,
                      profile: str | None = None, anonymous: bool = False,
                      addressing_style: str | None = None) -> Any:
    """An S3 client made the SDK way (see the module's docstring), closed with
    ``stack``; retries are left to the caller."""
    session = AioSession(profile=profile)
    s3_config: dict[str, Any] = {}
    if addressing_style:
        s3_config["addressing_style"] = addressing_style
    config = AioConfig(
        connect_timeout=options.connect_timeout, read_timeout=options.timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=options.concurrency, s3=s3_config or None,
        # SigV4 also for presigned URLs (botocore would presign with SigV2).
        signature_version=UNSIGNED if anonymous else "s3v4")
    region = region or os.environ.get("AWS_REGION") or None
    try:
        return await stack.enter_async_context(session.create_client(
            "s3", region_name=region, endpoint_url=endpoint_url, config=config))
    except _FAILURES as e:
        await stack.aclose()
        raise SourceError(f"{url}: cannot create an S3 client: {describe(e)}") from e


def translate_error(name: str, what: str, e: Exception) -> SourceError:
    """A botocore/aiohttp failure as transient (worth a retry) or permanent."""
    return _translate(name, what, e)


#: What botocore and aiohttp raise when a request fails.
FAILURES = _FAILURES


class S3Source(RemoteSource):
    """A read-only S3 object; open with :meth:`open`."""

    kind = "s3"
    probe_name = "HeadObject"
    # A HeadObject request is cheap: warm caches ask it every few seconds.
    version_check_interval = 5.0

    def __init__(self, url: str, client: Any, stack: contextlib.AsyncExitStack,
                 transport: CurlTransport, options: RemoteOptions, *,
                 if_match: bool = True) -> None:
        super().__init__(url, options)
        self.url = url
        self.bucket, self.key = parse_s3_url(url)
        self._client = client
        self._stack = stack
        self._transport = transport
        self._if_match = if_match
        self._conditions: tuple[str, ...] = ()
        self._read_url = ""
        self._signed_at = -_URL_REUSE

    @classmethod
    async def open(cls, url: str, options: RemoteOptions | None = None, *,
                   endpoint_url: str | None = None, region: str | None = None,
                   profile: str | None = None, anonymous: bool = False,
                   addressing_style: str | None = None, if_match: bool = True) -> S3Source:
        """Create a client the SDK way, HeadObject the key, and return the source."""
        opts = options or RemoteOptions()
        parse_s3_url(url)
        stack = contextlib.AsyncExitStack()
        client = await open_client(url, stack, opts, endpoint_url=endpoint_url, region=region,
                                   profile=profile, anonymous=anonymous,
                                   addressing_style=addressing_style)
        endpoint = client.meta.endpoint_url
        transport = CurlTransport(CurlSettings(
            connect_timeout=opts.connect_timeout, timeout=opts.timeout,
            user_agent="bootcache/0.1", proxy=proxy_from_environment(endpoint),
            # botocore's own variable for a private CA.
            ca_file=os.environ.get("AWS_CA_BUNDLE") or None,
            max_connections=opts.concurrency))
        stack.push_async_callback(transport.close)
        src = cls(url, client, stack, transport, opts, if_match=if_match)
        await src._learn_version(stack.aclose)
        return src

    def _set_identity(self, ident: dict[str, Any]) -> None:
        super()._set_identity(ident)
        etag = ident["etag"] if self._if_match else None
        self._conditions = (f"If-Match: {etag}",) if etag else ()

    async def _signed_url(self) -> str:
        """The GetObject URL, presigned by the client (fresh credentials included)."""
        now = time.monotonic()
        if now - self._signed_at >= _URL_REUSE:
            try:
                self._read_url = await self._client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": self.key},
                    ExpiresIn=_URL_EXPIRES)
            except _FAILURES as e:
                raise _translate(self.name, "signing GetObject", e) from e
            self._signed_at = now
        return self._read_url

    async def _probe(self) -> dict[str, Any]:
        try:
            r = await self._client.head_object(Bucket=self.bucket, Key=self.key)
        except _FAILURES as e:
            raise _translate(self.name, "HeadObject", e) from e
        headers = r.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return {"kind": "s3", "url": self.url, "endpoint": self._client.meta.endpoint_url,
                "size": int(r["ContentLength"]), "etag": r.get("ETag"),
                # The header as sent, comparable across opens and with HTTP sources.
                "last_modified": headers.get("last-modified"),
                "version_id": r.get("VersionId")}

    async def _fetch(self, offset: int, length: int) -> bytes:
        end = offset + length - 1
        what = f"GetObject bytes={offset}-{end}"
        url = await self._signed_url()
        try:
            # Room for an error reply's XML even on a short read.
            r = await self._transport.get(url, start=offset, end=end,
                                          limit=max(length, 4096), headers=self._conditions)
        except TransferFailed as e:
            raise e.as_source_error(self.name, what) from e
        self._check_status(what, r)
        return check_ranged_reply(self.name, what, r.status, r.headers.get("content-range"),
                                  r.body, r.overflow, offset, length, self._size)

    def _check_status(self, what: str, r: Reply) -> None:
        """S3 names its error in the body (``<Code>SlowDown</Code>``)."""
        if r.status in (200, 206):
            return
        m = _ERROR_CODE.search(r.body)
        code = m.group(1).decode("ascii", "replace") if m else ""
        if code in _TRANSIENT_CODES:
            raise TransientError(f"{self.name}: {what}: HTTP {r.status} {code}")
        check_status(self.name, what, r.status, code or r.reason)

    def stats(self) -> dict[str, int | float]:
        return {**super().stats(), "connections_opened": self._transport.connects}

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stack.aclose()
