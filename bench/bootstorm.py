"""The boot storm benchmark (same as ``bootcache bench bootstorm``).

    .venv/bin/python bench/bootstorm.py            # the full sweep (about 10 minutes)
    .venv/bin/python bench/bootstorm.py --quick    # a few seconds
"""

import sys

from bootcache.cli.bench import bootstorm

if __name__ == "__main__":
    sys.exit(bootstorm.main(sys.argv[1:]))
