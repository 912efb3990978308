# Two entry points (see README): `make studio` installs and launches the studio on the embedded default;
# `make test` installs what the tests need (Python packages and Debian's Chromium for the browser test) and runs
# the whole suite. Both work on a fresh machine with Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: studio test install install-test chromium bench

studio: install
	$(PY) app.py $(ARGS)

test: install-test chromium
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed tests/requirements.txt
	$(PY) -m pip install -r tests/requirements.txt
	touch $@

# The browser test drives Debian's Chromium through Playwright (never `playwright install`: it downloads).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y --no-install-recommends chromium; }

bench: install
	$(PY) bench/sampler.py --cold-start
