# Two commands get a fresh machine going:
#   make demo   - installs everything (Debian packages, a venv) and runs the main job:
#                 a quick boot storm (N VMs booting from one remote base, with and
#                 without bootcache), printing its table
#   make test   - runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo bootstorm traces test test-repeat lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/install-deps
	.ci/install-deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

demo: setup
	$(VENV)/bin/bootcache bench bootstorm --quick --out bench/out/quick

bootstorm: setup
	$(VENV)/bin/bootcache bench bootstorm --out bench/out/full

# Record both boot traces again from their guests (root; builds the guests
# first from a Debian mirror if they are not cached; a few minutes each under
# TCG). docs/traces.md describes them; compare with src/bootcache/storm/.
traces: setup
	mkdir -p bench/out/traces
	tools/record_boot_trace.sh services bench/out/traces/debian12-services-boot.trace
	tools/record_boot_trace.sh minbase bench/out/traces/debian12-minbase-boot.trace

test: setup
	$(VENV)/bin/pytest -q

# Stability: the tests N times in a row (TESTS narrows them, e.g.
# make test-repeat N=20 TESTS=tests/remote); stops at the first failing run.
N ?= 5
TESTS ?=
test-repeat: setup
	@for i in $$(seq 1 $(N)); do \
	  echo "== run $$i of $(N): pytest $(TESTS)"; \
	  $(VENV)/bin/pytest -q $(TESTS) || { echo "== run $$i of $(N) FAILED"; exit 1; }; \
	done; echo "== $(N) of $(N) runs passed: $(TESTS)"

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
