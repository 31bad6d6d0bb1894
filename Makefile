# make test    install into .venv, build, run the C++ (ctest) and Python (pytest) tests
# make bench   the same, then the pytest-benchmark suite and the memory report
# Re-running is quick: each step is redone only when its inputs changed.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := .stamps
# The versions pip picks on the development machines (torch wheel from the local disk).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BUILD_DEPS := "setuptools>=64" wheel ninja "cmake>=3.18"
TEST_DEPS := pytest hypothesis expecttest numpy
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f)
CORE_SOURCES := CMakeLists.txt $(shell find csrc/core tests/cpp bench/cpp -type f)
PYTEST_ARGS ?=

# CUDA sources compile wherever nvcc is; torch needs CUDA_HOME to find it.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: test bench build ctest neon-test pytest clean

test: ctest neon-test pytest

bench: $(STAMPS)/ext $(STAMPS)/core $(STAMPS)/bench-deps
	$(PY) -m bench.run

build: $(STAMPS)/ext $(STAMPS)/core

$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	$(PYTHON) -m venv $(VENV)
	@touch $@

$(STAMPS)/deps: $(STAMPS)/venv Makefile
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q $(BUILD_DEPS) $(TEST_DEPS)
	@touch $@

# the benchmark and peers extras of pyproject.toml (ONNX Runtime, OpenVINO)
$(STAMPS)/bench-deps: $(STAMPS)/ext pyproject.toml
	$(PIP) install -q -e ".[bench,peers]" --no-build-isolation
	@touch $@

$(STAMPS)/ext: $(STAMPS)/deps $(EXT_SOURCES)
	$(PIP) install -q -e . --no-build-isolation --no-deps
	@touch $@

$(STAMPS)/core: $(STAMPS)/deps $(CORE_SOURCES)
	PATH=$(abspath $(VENV))/bin:$$PATH cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
	PATH=$(abspath $(VENV))/bin:$$PATH ninja -C build/cmake
	@touch $@

ctest: $(STAMPS)/core
	PATH=$(abspath $(VENV))/bin:$$PATH ctest --test-dir build/cmake --output-on-failure

# NEON: the core cross-compiled for AArch64, its tests run under qemu-aarch64.
# The Debian packages are installed when missing; where apt cannot provide
# them the target says so and skips.
AARCH64_TOOLS := aarch64-linux-gnu-g++ qemu-aarch64
have_aarch64_tools = $(shell for t in $(AARCH64_TOOLS); do command -v $$t >/dev/null || exit; done; echo yes)

$(STAMPS)/aarch64-tools:
	@mkdir -p $(STAMPS)
	@if [ -z "$(have_aarch64_tools)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null \
	  || { apt-get update -q >/dev/null && apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null; } \
	  || echo "apt could not install g++-aarch64-linux-gnu qemu-user"; \
	fi
	@touch $@

neon-test: $(STAMPS)/aarch64-tools $(STAMPS)/deps
	@if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then \
	  PATH=$(abspath $(VENV))/bin:$$PATH cmake -S . -B build/aarch64 -G Ninja -DCMAKE_BUILD_TYPE=Release \
	    -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake >/dev/null \
	  && PATH=$(abspath $(VENV))/bin:$$PATH ninja -C build/aarch64 test_core \
	  && PATH=$(abspath $(VENV))/bin:$$PATH ctest --test-dir build/aarch64 --output-on-failure; \
	else \
	  echo "SKIPPED: NEON tests need g++-aarch64-linux-gnu and qemu-user, which apt could not install here"; \
	fi

pytest: $(STAMPS)/ext
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf build $(STAMPS) mnv2_kernels/_C*.so
