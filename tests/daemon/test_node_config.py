"""The node configuration file: ``serve --config node.toml``, reloaded on
SIGHUP (issue 10, item 3). A reload applies the catalog's difference as
adds and removes; an invalid file is refused with its line and reason, and
the running catalog stays as it was."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from bootcache.daemon import config as configmod
from cache.conftest import (
    MiB,
    assert_qemu_check,
    bootcache,
    create_cache,
    make_base,
    run,
)

SIZE = 2 * MiB


def write_config(path: Path, sock: str, exports: list[tuple[str, str]], extra: str = "") -> None:
    lines = ["[server]", f'socket = "{sock}"', 'socket_mode = "0660"', 'readahead = "128K"',
             "", "[backing]", f'dirs = ["{path.parent}"]', "", extra]
    for image, name in exports:
        lines += ["[[export]]", f'image = "{image}"', f'name = "{name}"', ""]
    path.write_text("\n".join(lines))


def names(d: Any) -> list[str]:
    return sorted(e["name"] for e in json.loads(d.ctl("list", "--output", "json").stdout))


def wait_for_names(d: Any, want: list[str], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while names(d) != want:
        assert time.monotonic() < end, f"catalog {names(d)}, expected {want}\n{d.log()}"
        time.sleep(0.05)


def test_config_file_and_sighup_reload(tmp_path: Path, daemons: Any) -> None:
    base = make_base(tmp_path / "base.raw", SIZE, seed=7)
    caches = []
    for i in range(3):
        cache = tmp_path / f"c{i}.qcow2"
        create_cache(cache, "base.raw", quota="100M")
        caches.append(cache)
    cfg = tmp_path / "node.toml"
    d = daemons("--config", str(cfg), start=False)
    write_config(cfg, d.sock, [(str(caches[0]), "zero"), (str(caches[1]), "one")])
    d.start()
    assert names(d) == ["one", "zero"]
    assert (Path(d.sock).stat().st_mode & 0o777) == 0o660
    assert run(["nbdcopy", d.uri("zero"), "-"]).stdout == base
    # zero goes, two comes, one stays untouched.
    write_config(cfg, d.sock, [(str(caches[1]), "one"), (str(caches[2]), "two")])
    d.signal(signal.SIGHUP)
    wait_for_names(d, ["one", "two"])
    assert run(["nbdcopy", d.uri("two"), "-"]).stdout == base
    # An invalid file: refused with the line, nothing changes.
    good = cfg.read_text()
    cfg.write_text(good + '\n[[export]]\nimage = "/x.qcow2"\nbogus = 1\n')
    proc = d.ctl("reload", check=False)
    assert proc.returncode != 0
    last = len(cfg.read_text().splitlines())
    assert f"line {last}" in proc.stderr and "bogus" in proc.stderr, proc.stderr
    d.signal(signal.SIGHUP)  # also refused by signal, and logged
    end = time.monotonic() + 30
    while "reload refused" not in d.log():
        assert time.monotonic() < end, d.log()
        time.sleep(0.05)
    assert names(d) == ["one", "two"]
    assert d.stop() == 0
    for cache in caches:
        assert_qemu_check(cache)


@pytest.mark.parametrize(("text", "line", "says"), [
    ("[server]\nsocket = 5\n", 2, "socket"),
    ('[server]\nsocket = "/s"\nlisten = ["nohost"]\n', 3, "HOST:PORT"),
    ('[server]\nsocket = "/s"\n\n[tls]\ncert = "/c"\n', 0, "key go together"),
    ('[server]\nsocket = "/s"\nsocket_mode = "999"\n', 3, "socket_mode"),
    ('[serve]\nsocket = "/s"\n', 1, "unknown section"),
    ('[server]\nsocket = "/s"\n[[export]]\nname = "x"\n', 3, "needs image"),
    ('[server]\nsocket = "/s"\n[[export]]\nimage = "/a.qcow2"\n[[export]]\n'
     'image = "/b/a.qcow2"\n', 6, "given twice"),
    ('[server]\nsocket = "/s"\nreadahead = "lots"\n', 3, "not a size"),
    ("[server\n", 1, "line 1"),
])
def test_invalid_config_names_line_and_reason(tmp_path: Path, text: str, line: int,
                                              says: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(configmod.ConfigError) as info:
        configmod.load(str(path))
    message = str(info.value)
    assert says in message, message
    if line:
        assert f"line {line}" in message, message
    # The command says the same and starts nothing.
    proc = bootcache("serve", "--config", path, check=False)
    assert proc.returncode != 0 and says in proc.stderr.decode(), proc.stderr
