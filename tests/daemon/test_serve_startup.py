"""``bootcache serve`` is ready when its NBD socket appears (issue 13).

A client may connect the moment the socket exists. Importing aiohttp (the
control server's, about 0.1 s of CPU) after that blocked the loop serving
the first reads; the daemon imports it before it binds the socket.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cache.conftest import child_env, create_cache, make_base, run

# Runs in the daemon (as its sitecustomize): when the NBD socket is bound,
# note whether the control server's aiohttp was imported already.
_PROBE = """
import os, sys

def _hook(event, args):
    if event == "socket.bind" and args[1] == os.environ["PROBE_SOCKET"]:
        with open(os.environ["PROBE_OUT"], "w") as f:
            f.write("aiohttp imported" if "aiohttp" in sys.modules else "aiohttp not imported")

sys.addaudithook(_hook)
"""


def test_slow_imports_happen_before_the_nbd_socket_appears(tmp_path: Path,
                                                         daemons: Any) -> None:
    base = make_base(tmp_path / "base.raw", 1 << 20, seed=13)
    create_cache(tmp_path / "cache.qcow2", "base.raw", quota="10M")
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(_PROBE)
    out = tmp_path / "probe.out"
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(probe_dir), env["PYTHONPATH"]])
    env["PROBE_OUT"] = str(out)
    d = daemons(f"{tmp_path / 'cache.qcow2'}=boot", env=env, start=False)
    env["PROBE_SOCKET"] = d.sock
    d.start()
    assert out.read_text() == "aiohttp imported"
    # And it serves (the probe changed nothing else).
    assert run(["nbdcopy", d.uri("boot"), "-"]).stdout == base
