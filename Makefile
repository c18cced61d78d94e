# Two commands get a fresh machine going:
#   make demo   - installs everything (Debian packages, a venv) and runs the main job
#   make test   - runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /tmp/bootcache-demo

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/install-deps
	.ci/install-deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(PY) -m bootcache.demo $(DEMO_DIR)

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
