# The README's commands. Each sets up .venv when missing and rebuilds only what is out of date.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.slimrate-deps
BUILD_STAMP := $(VENV)/.slimrate-build
EXT_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
JOBS ?= $(shell nproc)

.PHONY: demo test bench build lint clean peers

demo: $(BUILD_STAMP)
	$(VENV)/bin/slimrate demo

test: $(BUILD_STAMP)
	$(VPY) -m pytest -q tests

bench: $(BUILD_STAMP)
	$(VPY) -m pytest bench/bench_rate_grad.py --benchmark-only --benchmark-json bench/results/rate_grad.json
	$(VPY) bench/summarize.py bench/results/rate_grad.json bench/results/rate_grad.md
	$(VPY) -m pytest bench/bench_coding.py --benchmark-only --benchmark-json bench/results/coding.json
	$(VPY) bench/summarize.py bench/results/coding.json bench/results/coding.md
	$(VPY) -m pytest bench/bench_sparse.py --benchmark-only --benchmark-json bench/results/sparse.json
	$(VPY) bench/sparse_report.py bench/results/sparse.json bench/results/sparse.md
	$(VPY) -m pytest bench/bench_sparse_e2e.py --benchmark-only --benchmark-json bench/results/sparse_e2e.json
	$(VPY) bench/summarize.py bench/results/sparse_e2e.json bench/results/sparse_e2e.md
	$(VPY) -m pytest bench/bench_nf4.py --benchmark-only --benchmark-json bench/results/nf4.json
	$(VPY) bench/nf4_report.py bench/results/nf4.json bench/results/nf4.md
	$(VPY) -m pytest bench/bench_ctmc.py --benchmark-only --benchmark-json bench/results/ctmc.json
	$(VPY) bench/summarize.py bench/results/ctmc.json bench/results/ctmc.md
	$(VPY) -m pytest bench/bench_dmb_train.py --benchmark-only --benchmark-json bench/results/dmb_train.json
	$(VPY) bench/summarize.py bench/results/dmb_train.json bench/results/dmb_train.md

build: $(BUILD_STAMP)

# nncodec (DeepCABAC) for the BackSlash study's comparison, in its own venv: it needs a torch of its own,
# never installed into .venv. torch/torchvision are the releases pip takes from this machine's disk.
peers:
	test -x bench/.venv-peers/bin/python || $(PYTHON) -m venv bench/.venv-peers
	bench/.venv-peers/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
		nncodec==2.1.3 safetensors

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check python triton_kernels tests bench tools

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): pyproject.toml tools/install_deps.py | $(VPY)
	$(VPY) tools/install_deps.py
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build python/slimrate/*.so $(BUILD_STAMP)
