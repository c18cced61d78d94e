"""Per-run ratios of mean read time between the two configurations of a
``bootcache bench bootstorm --runs K --configs A,B`` run, from its progress log.

Each run starts with "writing the base"; within a run, the storms of the
same gap scale and N are paired: B / A when the two configurations differ
(A is the one named ``--base``), second / first when they are the same (an
A/A run: the measurement's own resolution). Prints every run's ratio and
their median, per storm.

Usage:
    .venv/bin/bootcache bench bootstorm --runs 6 ... --configs bootcache-cold,X > run.log
    .venv/bin/python bench/storm_ratios.py run.log [--base bootcache-cold]
"""

from __future__ import annotations

import argparse
import re
import statistics

LINE = re.compile(r"(\S+)\s+gap x(\S+)\s+N=(\d+)\s+boot\s+\S+ s.*read\s+(\S+) ms")


def runs_of(path: str) -> list[dict[tuple[str, int], list[tuple[str, float]]]]:
    runs: list[dict[tuple[str, int], list[tuple[str, float]]]] = []
    with open(path) as f:
        for line in f:
            if line.startswith("writing the base"):
                runs.append({})
                continue
            m = LINE.match(line)
            if m and runs:
                config, gaps, n, mean_ms = m.groups()
                runs[-1].setdefault((gaps, int(n)), []).append((config, float(mean_ms)))
    return runs


def ratio(pair: list[tuple[str, float]], base: str) -> float:
    (c1, t1), (c2, t2) = pair[:2]
    if c1 == c2:
        return t2 / t1
    return t2 / t1 if c1 == base else t1 / t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--base", default="bootcache-cold", help="the configuration divided by")
    args = ap.parse_args()
    for path in args.logs:
        print(path)
        runs = runs_of(path)
        for key in sorted({k for r in runs for k in r}):
            ratios = [ratio(r[key], args.base) for r in runs if len(r.get(key, [])) >= 2]
            if ratios:
                print(f"  gaps x{key[0]} N={key[1]}: "
                      + " ".join(f"{x:.2f}" for x in ratios)
                      + f"  median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
