# The README's commands. Each sets up .venv when missing and rebuilds only what is out of date.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.slimrate-deps
BUILD_STAMP := $(VENV)/.slimrate-build
EXT_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
JOBS ?= $(shell nproc)
# The ExecuTorch kernels of slimrate's ops (docs/edge.md), built by CMake against the executorch package in .venv
# and copied into the Python package, where `import slimrate.edge` loads them.
EDGE_LIB := python/slimrate/edge/libslimrate_edge.so
EDGE_SOURCES := $(shell find edge csrc/core csrc/kernels -name '*.cpp' -o -name '*.h' -o -name CMakeLists.txt)

.PHONY: demo test test-arm fuzz bench bench-7b build edge lint clean peers

demo: $(BUILD_STAMP)
	$(VENV)/bin/slimrate demo

test: $(BUILD_STAMP) $(EDGE_LIB)
	$(VPY) -m pytest -q tests

# aarch64: every C++ file of the extension cross-compiled against torch's headers, and the kernel core's C++
# checks run under qemu-aarch64 (tools/core_check.py; it installs the cross compiler and qemu with apt-get when
# missing, and skips with a message where it cannot). Needs no build of the extension. Then the edge runtime
# cross-compiled against the aarch64 executorch wheel, its runner under qemu on the host runner's .pte files
# (tools/edge_arm_check.py; skips with a message where the toolchain or the wheel cannot be had).
test-arm: $(DEPS_STAMP) $(EDGE_LIB)
	PYTHONPATH=python $(VPY) tools/core_check.py --arm
	PYTHONPATH=python $(VPY) tools/edge_arm_check.py

# The seeded fuzzer of the .slim reader and the coder ops (README "Reliability"): 140,000 cases, 105,000 of them
# .slim files, in 2 worker processes, about a minute on 2 cores. Writes bench/results/fuzz.{json,md} and the
# first failing input of each kind to build/fuzz-failures/ (tools/fuzz_slim.py --replay FILE runs one again);
# fails when any case failed.
fuzz: $(BUILD_STAMP)
	$(VPY) tools/fuzz_slim.py --cases 140000 --workers 2 --seed 0 -o bench/results/fuzz --save-failures build/fuzz-failures

# $(call bench_suite,NAME,REPORT): bench/bench_NAME.py into bench/results/NAME.json, then bench/REPORT turns it
# into bench/results/NAME.md.
define bench_suite
$(VPY) -m pytest bench/bench_$(1).py --benchmark-only --benchmark-json bench/results/$(1).json
$(VPY) bench/$(2) bench/results/$(1).json bench/results/$(1).md
endef

bench: $(BUILD_STAMP) $(EDGE_LIB)
	$(call bench_suite,rate_grad,summarize.py)
	$(call bench_suite,coding,summarize.py)
	$(call bench_suite,sparse,sparse_report.py)
	$(call bench_suite,sparse_e2e,summarize.py)
	$(call bench_suite,nf4,nf4_report.py)
	$(call bench_suite,ctmc,summarize.py)
	$(call bench_suite,dmb_train,summarize.py)
	$(call bench_suite,edge,edge_report.py)
	$(call bench_suite,fsdp,fsdp_report.py)
	$(VPY) bench/slim_llm.py --layers 1 -o bench/results/slim_llm_1layer

# The .slim path on a Llama-2-7B-shaped checkpoint (6.74B parameters, 13.5 GB of bf16 generated on demand; needs
# ~35 GB of free disk and about half an hour on 2 cores).
bench-7b: $(BUILD_STAMP)
	$(VPY) bench/slim_llm.py --layers 32 -o bench/results/slim_llm_7b

build: $(BUILD_STAMP)

edge: $(EDGE_LIB)

# nncodec (DeepCABAC) for the BackSlash study's comparison, in its own venv: it needs a torch of its own,
# never installed into .venv. torch/torchvision are the releases pip takes from this machine's disk.
peers:
	test -x bench/.venv-peers/bin/python || $(PYTHON) -m venv bench/.venv-peers
	bench/.venv-peers/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
		nncodec==2.1.3 safetensors

# ruff, then the package layers of pyproject.toml's import-linter contract.
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check python tests bench tools
	$(VENV)/bin/lint-imports --no-cache

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): pyproject.toml tools/install_deps.py | $(VPY)
	$(VPY) tools/install_deps.py
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

$(EDGE_LIB): $(DEPS_STAMP) $(EDGE_SOURCES)
	$(VENV)/bin/cmake -S edge -B build/edge -DCMAKE_BUILD_TYPE=Release \
		-DEXECUTORCH_DIR="$$($(VPY) -c 'import executorch; print(executorch.__path__[0])')"
	$(VENV)/bin/cmake --build build/edge -j $(JOBS)
	cp build/edge/libslimrate_edge.so $@

clean:
	rm -rf build python/slimrate/*.so $(EDGE_LIB) $(BUILD_STAMP)
