"""Acceptance 6: mutated images only ever raise bootcache's own errors, and never hang.

Runs the campaign of tools/fuzz_qcow2.py with a small time budget and a fixed
seed; ``tools/fuzz_qcow2.py --seconds N [--differential]`` runs the same thing
for longer. The differential run also has QEMU read every case that
``qemu-img check`` finds clean: bootcache must then read the same bytes.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

TOOL = Path(__file__).resolve().parents[2] / "tools" / "fuzz_qcow2.py"
BUDGET = float(os.environ.get("BOOTCACHE_FUZZ_SECONDS", "15"))
DIFF_BUDGET = float(os.environ.get("BOOTCACHE_FUZZ_DIFF_SECONDS", "10"))


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_qcow2", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_fuzz_header_and_metadata(tmp_path: Path) -> None:
    fuzz = _load_tool()
    seed = int(os.environ.get("BOOTCACHE_FUZZ_SEED", "1"))
    report = fuzz.campaign(BUDGET, tmp_path / "work", seed=seed, timeout=10.0,
                           out=tmp_path / "failures", max_failures=10)
    details = "\n".join(
        f"--- {f['type']}: case {f['case_seed']} of seed image {f['seed']} "
        f"(write={f['write']}): {f['mutations']}\n{f['traceback']}"
        for f in report.failures)
    assert not report.failures, (
        f"{report.summary()}\nreplay with: tools/fuzz_qcow2.py --replay <kept case>\n{details}")
    # The budget must buy a meaningful number of cases, most of them really parsed.
    assert report.cases >= 100, report.summary()
    assert report.ok > report.cases // 20, report.summary()


def test_fuzz_differential_against_qemu(tmp_path: Path) -> None:
    fuzz = _load_tool()
    seed = int(os.environ.get("BOOTCACHE_FUZZ_SEED", "2"))
    report = fuzz.campaign(DIFF_BUDGET, tmp_path / "work", seed=seed, timeout=10.0,
                           out=tmp_path / "failures", max_failures=10, differential=True)
    details = "\n".join(
        f"--- {f['type']}: case {f['case_seed']} of seed image {f['seed']} "
        f"(write={f['write']}): {f['mutations']}\n{f['traceback']}"
        for f in report.failures)
    assert not report.failures, f"{report.summary()}\n{details}"
    assert report.compared >= 10, report.summary()


# Cases long campaigns found (seed image, case seed): each must now open and
# be read and written through bootcache, or be refused with a BootcacheError.
FOUND_CASES = [
    # A dirty image whose repair made refcount blocks past the counted
    # clusters: the check indexed past its table (IndexError).
    ("zstd-compressed", 10006511),
    # The 1M campaign (seeds 1000-1019):
    # a backing name "nbd+unix:///x?so" raised ValueError, not a refusal;
    ("v2-backing", 1007049031),
    # a dirty image's repair counted a refcount block that a mutated table
    # entry put terabytes past the file's end (MemoryError);
    ("rc64-lazy", 1014026650),
    ("zstd-compressed", 1017040559),
    # a write in place to a data cluster whose L2 entry points far past the
    # file's end (EFBIG from the file system, not a corrupt-image refusal).
    ("zstd-rc1", 1015007223),
    ("v3", 1019024760),
]


def test_fuzz_cases_found_by_campaigns(tmp_path: Path) -> None:
    from bootcache.errors import BootcacheError

    fuzz = _load_tool()
    seeds = {s.name: s for s in fuzz.build_seeds(tmp_path)}
    for seed_name, case_seed in FOUND_CASES:
        case = fuzz.mutate(seeds[seed_name], case_seed)
        path = tmp_path / f"case-{case_seed}.qcow2"
        path.write_bytes(case.data)
        try:
            fuzz.exercise(str(path), case.write, case_seed)
        except BootcacheError:
            pass  # refused with a clear error: what the campaign accepts
