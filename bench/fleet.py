"""The fleet benchmark (same as ``bootcache bench fleet``; needs root).

    .venv/bin/python bench/fleet.py                       # K=8 nodes x M=8 VMs, all configurations
    .venv/bin/python bench/fleet.py -k 2 -m 2 --configs no-cache,cold
"""

import sys

from bootcache.cli.bench import fleet

if __name__ == "__main__":
    sys.exit(fleet.main(sys.argv[1:]))
