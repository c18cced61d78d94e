"""Mutated NBD sessions against a live ``bootcache serve``, outside CI.

    .venv/bin/python tools/fuzz_nbd.py --sessions 100000 --seed 1

A daemon serves a cache image over a pattern base (cluster k holds the byte
k % 251 + 1). Each session is built as a well-formed client would speak
(fixed newstyle handshake, options among STRUCTURED_REPLY, LIST, INFO,
SET_META_CONTEXT, then GO or EXPORT_NAME; then READ, BLOCK_STATUS, CACHE,
FLUSH, WRITE, TRIM, WRITE_ZEROES, unknown commands; then DISC or not), then
mutated: bytes flipped, length and offset fields set to edge values, bytes
inserted or cut, messages repeated or swapped, the stream truncated; one in
ten is left intact. Sessions run ``--parallel`` at a time; each sends its
stream in random pieces, drains what the server answers, and hangs up.

Every ``--check-every`` sessions a checker (qemu-io, a real client) reads
random clusters with ``read -P``, and the daemon's RSS is sampled. The
campaign fails if the daemon dies, a byte read is wrong, or the cache does
not pass ``qemu-img check`` at the end. It prints the sessions run, their
rate, wrong bytes, and RSS first / last / max.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLUSTER = 64 << 10
PY = sys.executable
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
EDGES32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 65536, 1 << 25]
EDGES64 = [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def option(code: int, data: bytes) -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def export_query(name: bytes, infos: list[int]) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_query(name: bytes, contexts: list[bytes]) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
            + b"".join(struct.pack(">I", len(c)) + c for c in contexts))


def session(rng: random.Random, size: int) -> list[bytes]:
    """The messages of a well-formed client session."""
    name = b"deb" if rng.random() < 0.9 else rng.choice([b"", b"nope", b"deb" * 100])
    msgs = [struct.pack(">I", 1 | (2 if rng.random() < 0.5 else 0))]
    if rng.random() < 0.7:
        msgs.append(option(8, b""))
    if rng.random() < 0.2:
        msgs.append(option(3, b""))
    if rng.random() < 0.3:
        msgs.append(option(10, meta_query(name, [b"base:allocation"])))
    if rng.random() < 0.2:
        msgs.append(option(6, export_query(name, [0, 1, 2, 3])))
    if rng.random() < 0.9:
        msgs.append(option(7, export_query(name, rng.sample([0, 1, 2, 3], rng.randint(0, 2)))))
    else:
        msgs.append(option(1, name))
    for handle in range(rng.randint(0, 10)):
        cmd = rng.choice([0, 0, 0, 0, 7, 5, 3, 1, 4, 6, rng.randint(8, 0xFFFF)])
        offset = rng.choice([rng.randrange(size) // 512 * 512, rng.randrange(size),
                             size - 512, size])
        length = rng.choice([512, 4096, CLUSTER, 3 * CLUSTER + 17, rng.randint(1, 1 << 20)])
        flags = rng.choice([0, 0, 1, 2, 4, 8, rng.randint(0, 0xFFFF)])
        msg = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)
        if cmd == 1:
            msg += bytes(min(length, 1 << 16))
        msgs.append(msg)
    if rng.random() < 0.8:
        msgs.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 99, 0, 0))
    return msgs


def mutate(rng: random.Random, msgs: list[bytes]) -> bytes:
    if rng.random() < 0.1:
        return b"".join(msgs)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        if kind == 0 and len(msgs) > 1:
            i = rng.randrange(len(msgs))
            msgs.insert(i, msgs[i])
        elif kind == 1 and len(msgs) > 2:
            i, j = rng.sample(range(len(msgs)), 2)
            msgs[i], msgs[j] = msgs[j], msgs[i]
        elif kind == 2:
            i = rng.randrange(len(msgs))
            msgs[i] = msgs[i][:rng.randrange(len(msgs[i]) + 1)]
    data = bytearray(b"".join(msgs))
    for _ in range(rng.randint(1, 4)):
        if not data:
            break
        pos = rng.randrange(len(data))
        kind = rng.randrange(6)
        if kind == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[pos] = rng.randrange(256)
        elif kind == 2 and pos + 4 <= len(data):
            data[pos:pos + 4] = struct.pack(">I", rng.choice(EDGES32))
        elif kind == 3 and pos + 8 <= len(data):
            data[pos:pos + 8] = struct.pack(">Q", rng.choice(EDGES64))
        elif kind == 4:
            data[pos:pos] = rng.randbytes(rng.randint(1, 64))
        else:
            del data[pos:pos + rng.randint(1, 64)]
    if rng.random() < 0.2:
        del data[rng.randrange(len(data) + 1):]
    return bytes(data)


async def run_session(sock: str, stream: bytes, rng: random.Random) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(sock), 5)
    except (TimeoutError, OSError):
        return
    try:
        pos = 0
        while pos < len(stream):
            n = rng.randint(1, 4096)
            writer.write(stream[pos:pos + n])
            pos += n
            await writer.drain()
        # Drain what the server says until it hangs up or goes quiet.
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 0.2)
            if not chunk:
                break
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def open_connections(sock: str) -> int:
    """Connections the daemon still counts (all sessions have hung up)."""
    out = subprocess.run([PY, "-m", "bootcache", "ctl", "--control", sock + ".ctl", "list",
                          "--output", "json"], capture_output=True, text=True, timeout=60)
    return sum(e["connections"] for e in json.loads(out.stdout))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def check_reads(sock: str, clusters: int, rng: random.Random) -> tuple[int, int]:
    """(wrong reads, failed reads) of 16 random clusters through qemu-io."""
    args = []
    for k in rng.sample(range(clusters), 16):
        args += ["-c", f"read -P {k % 251 + 1} {k * CLUSTER} {CLUSTER}"]
    out = subprocess.run(["qemu-io", "-r", "-f", "raw", f"nbd+unix:///deb?socket={sock}",
                          *args], capture_output=True, text=True, timeout=120).stdout
    return out.count("Pattern verification failed"), 16 - out.count("read 65536/65536")


async def campaign(args: argparse.Namespace, work: Path) -> int:
    clusters = args.size_mib * (1 << 20) // CLUSTER
    size = clusters * CLUSTER
    with open(work / "base.raw", "wb") as f:
        for k in range(clusters):
            f.write(bytes([k % 251 + 1]) * CLUSTER)
    cache = work / "cache.qcow2"
    subprocess.run([PY, "-m", "bootcache", "create", "-q", "-f", "qcow2", "--cache-quota",
                    f"{args.size_mib // 2}M", "--cache-policy", "lru", "-b",
                    str(work / "base.raw"), "-F", "raw", str(cache), str(size)], check=True)
    sock = str(work / "s.sock")
    env = dict(os.environ, BOOTCACHE_BACKING_DIRS=str(work))
    log = open(work / "serve.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen([PY, "-m", "bootcache", "serve", "--socket", sock,
                               f"{cache}=deb"], stdout=log, stderr=subprocess.STDOUT, env=env)
    while not os.path.exists(sock + ".ctl"):
        if daemon.poll() is not None:
            raise SystemExit("bootcache serve did not start")
        await asyncio.sleep(0.05)
    rng = random.Random(args.seed)
    check_rng = random.Random(args.seed + 1)
    wrong = failed = done = 0
    rss = [rss_kib(daemon.pid)]
    start = time.monotonic()
    try:
        while done < args.sessions:
            batch = min(args.check_every, args.sessions - done)
            pending: set[asyncio.Task[None]] = set()
            for _ in range(batch):
                srng = random.Random(rng.getrandbits(64))
                stream = mutate(srng, session(srng, size))
                pending.add(asyncio.create_task(run_session(sock, stream, srng)))
                if len(pending) >= args.parallel:
                    _, pending = await asyncio.wait(pending,
                                                    return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*pending)
            done += batch
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon died after {done} sessions "
                                 f"(exit {daemon.returncode}); see {work}/serve.log")
            w, f_ = await asyncio.to_thread(check_reads, sock, clusters, check_rng)
            wrong += w
            failed += f_
            rss.append(rss_kib(daemon.pid))
            conns = await asyncio.to_thread(open_connections, sock)
            rate = done / (time.monotonic() - start)
            print(f"{done} sessions ({rate:.0f}/s): wrong reads {wrong}, failed reads "
                  f"{failed}, RSS {rss[-1]} KiB, connections still open {conns}", flush=True)
    finally:
        daemon.terminate()
        daemon.wait()
        log.close()
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file",
                                                          "filename": str(cache)}}
    check = subprocess.run(["qemu-img", "check", "json:" + json.dumps(spec)],
                           capture_output=True).returncode
    elapsed = time.monotonic() - start
    print(f"nbd sessions: {done}, seed {args.seed}, {elapsed:.0f} s ({done / elapsed:.0f}/s); "
          f"wrong reads {wrong}, failed reads {failed}; RSS KiB first {rss[0]}, "
          f"last {rss[-1]}, max {max(rss)}; cache check "
          f"{'clean' if check == 0 else f'exit {check}'}")
    return 1 if wrong or failed or check != 0 else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--check-every", type=int, default=2000)
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bcfuzznbd", dir="/tmp"))
    try:
        rc = asyncio.run(campaign(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
