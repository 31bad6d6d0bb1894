# make test    install into .venv, build, run the C++ (ctest) and Python (pytest) tests
# make bench   the same, then the pytest-benchmark suite and the memory report
# make sanitize       the core's C++ tests under ASan+UBSan and TSan (part of make test)
# make sanitize-ext   the extension built with ASan+UBSan, pytest on it (minutes; not in make test)
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
TEST_DEPS := pytest hypothesis expecttest numpy onnx onnxscript onnxruntime timm
EXT_SOURCES := setup.py pyproject.toml cmake/isa_flags.txt $(shell find csrc -type f)
CORE_SOURCES := CMakeLists.txt cmake/isa_flags.txt $(shell find csrc/core tests/cpp bench/cpp -type f)
PYTEST_ARGS ?=

# CUDA sources compile wherever nvcc is; torch needs CUDA_HOME to find it.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: test bench build ctest neon-test pytest triton-test cuda-resources gpu-check-dry clean

test: ctest neon-test pytest triton-test gpu-check-dry sanitize

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

# Sanitizers: the core and its C++ tests built with -DMNV2_SANITIZE (CMakeLists.txt)
# and run by ctest; any report fails. build/asan: ASan + UBSan, the whole test_core;
# build/tsan: ThreadSanitizer, test_core --threaded (the cases run on std::threads).
SAN_ENV := PATH=$(abspath $(VENV))/bin:$$PATH UBSAN_OPTIONS=print_stacktrace=1
.PHONY: sanitize sanitize-ext
sanitize: $(STAMPS)/deps
	$(SAN_ENV) cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DMNV2_SANITIZE=address,undefined -DMNV2_TEST_ARGS= >/dev/null
	$(SAN_ENV) ninja -j2 -C build/asan test_core
	$(SAN_ENV) ctest --test-dir build/asan --output-on-failure
	$(SAN_ENV) cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DMNV2_SANITIZE=thread -DMNV2_TEST_ARGS=--threaded >/dev/null
	$(SAN_ENV) ninja -j2 -C build/tsan test_core
	$(SAN_ENV) ctest --test-dir build/tsan --output-on-failure

# The Python extension built with ASan + UBSan (CPU only) into build/asan-ext/pkg, next
# to a copy of the package, and pytest on it with libasan preloaded (python itself is
# not instrumented; libstdc++ is preloaded too, or ASan cannot intercept the C++
# exceptions of libraries loaded later). Leak checks are off: Python leaks by design;
# allocator_may_return_null: the bad-input tests ask for huge tensors, which must fail
# with torch's error rather than ASan's abort. --capture=sys: a report (which aborts the
# process) reaches the terminal instead of pytest's lost capture file.
ASAN_EXT := build/asan-ext/pkg
SANITIZE_EXT_TESTS ?= tests/test_ops.py tests/test_bad_input.py tests/test_threads.py tests/test_determinism.py
sanitize-ext: $(STAMPS)/deps
	MNV2_SANITIZE=address,undefined MNV2_BUILD_CUDA=0 MAX_JOBS=$${MAX_JOBS:-1} \
	  $(PY) setup.py -q build_ext --build-lib $(ASAN_EXT)
	rm -rf $(ASAN_EXT)/mnv2_kernels/*.py $(ASAN_EXT)/mnv2_kernels/triton_kernels
	mkdir -p $(ASAN_EXT)/mnv2_kernels/triton_kernels
	cp mnv2_kernels/*.py $(ASAN_EXT)/mnv2_kernels/
	cp triton_kernels/*.py $(ASAN_EXT)/mnv2_kernels/triton_kernels/
	cd $(ASAN_EXT) && export PYTHONPATH=$(abspath $(ASAN_EXT)) \
	  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
	  UBSAN_OPTIONS=print_stacktrace=1 \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	&& $(abspath $(PY)) -c "import mnv2_kernels as m; f = m._extension._C.__file__; \
	  assert '$(ASAN_EXT)' in f, f'not the ASan build: {f}'" \
	&& $(abspath $(PY)) -m pytest -p no:cacheprovider -q --capture=sys -k 'not slow' \
	  $(addprefix $(abspath .)/,$(SANITIZE_EXT_TESTS)) $(PYTEST_ARGS)

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

# The Triton kernels on the CPU, in Triton's interpreter (which must be chosen
# before triton is imported, hence a process of their own).
triton-test: $(STAMPS)/ext
	TRITON_INTERPRET=1 $(PY) -m pytest tests/triton $(PYTEST_ARGS)

# The property-based tests with the long hypothesis budget (HYPOTHESIS_PROFILE=fuzz,
# tests/conftest.py): the CPU kernel (each other CPU ISA in a subprocess of its own),
# then the Triton kernels in the interpreter. `make test` runs the seeded CI budget.
.PHONY: fuzz
fuzz: $(STAMPS)/ext
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_fuzz.py $(PYTEST_ARGS)
	HYPOTHESIS_PROFILE=fuzz TRITON_INTERPRET=1 $(PY) -m pytest tests/triton/test_triton_fuzz.py $(PYTEST_ARGS)

# ptxas's resource report of the CUDA kernels for sm_90: registers, shared
# memory, stack frame and spills (there must be no spills in the hot kernels).
cuda-resources: $(STAMPS)/deps
	@mkdir -p build/ptxas
	@inc=$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths('cuda')))"); \
	for f in csrc/cuda/*.cu; do \
	  $(CUDA_HOME)/bin/nvcc -std=c++20 -O3 -gencode=arch=compute_90,code=sm_90 -Xptxas=-v \
	    --expt-relaxed-constexpr -DMNV2_WITH_CUDA -Icsrc $$inc -c $$f -o build/ptxas/$$(basename $$f).o \
	    2>&1 | grep -E "Compiling entry|Used|spill|stack frame" | sed -E "s/ptxas info *: //; s/'//g" \
	    | c++filt | sed -E 's/\(anonymous namespace\):://g; s/mnv2::cuda:://g'; \
	done

# bench/gpu_check.sh rehearsed on the CPU (about 1 minute; part of make test): the same
# steps, tiny sizes, Triton interpreted, tests/triton in 2 concurrent pytest processes
# (bench/shard_pytest.py), the benchmark's warm-up and its 3 first blocks. Fails when a
# step does not end ok or the summary is missing.
gpu-check-dry: $(STAMPS)/ext
	OUT=build/gpu-check-dry PYTHON=$(PY) bench/gpu_check.sh --dry-run --no-build
	@test -s build/gpu-check-dry/summary.md && test -s build/gpu-check-dry/summary.json

clean:
	rm -rf build $(STAMPS) mnv2_kernels/_C*.so
