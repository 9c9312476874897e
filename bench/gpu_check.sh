#!/usr/bin/env bash
# The one script for a lent GPU machine (DESIGN.md "No GPU here; some sessions get one"):
# build with CUDA, run the tests on the GPU, run the CUDA benchmarks, and write
# bench/results/gpu-<card>-<date>.md.  The machine has no network: pip builds with the python3
# that is there (--no-build-isolation: an isolated build would try to download setuptools and
# torch and hang).  Each stage has a time limit inside a 470 s budget (the device tool allows
# 8 minutes); a failed stage is written to the results file and the next stage still runs.
# Where the device tool set $OUT, the results file and the full logs are copied there.
set -u
cd "$(dirname "$0")/.."

BUDGET_S=470
START_S=$SECONDS
PY=python3
LOGS=$(mktemp -d)

remaining() { echo $((BUDGET_S - (SECONDS - START_S))); }
# Time limit of the next stage: its own cap, or what is left of the budget if less (at least 1 s:
# `timeout 0` would mean no limit).
limit() { local left; left=$(remaining); left=$((left < $1 ? left : $1)); echo $((left > 1 ? left : 1)); }

card_raw=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
card=$(echo "${card_raw:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | tr ' ' '-' | tr -cd 'a-z0-9._-')
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)
# "9.0" on H100/H200: build for this card only, which keeps the build short.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1)
RESULTS=bench/results/gpu-${card}-$(date +%F).md
mkdir -p bench/results

publish() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT/logs"
  cp "$RESULTS" "$OUT/"
  cp "$LOGS"/*.log "$OUT/logs/" 2>/dev/null
  return 0
}
section() { printf '\n## %s\n\n' "$1" >>"$RESULTS"; }
# Appends lines of stdin as a fenced block.
fenced() { { echo '```'; cat; echo '```'; } >>"$RESULTS"; }
status_line() {  # stage name, exit code, seconds
  local what
  case $2 in
    0) what="ok" ;;
    124|137) what="TIMED OUT" ;;
    *) what="FAILED (exit $2)" ;;
  esac
  echo "- $1: $what in $3 s" >>"$RESULTS"
}

{
  echo "# GPU check: ${card_raw:-unknown GPU}"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- card: ${card_raw:-nvidia-smi not found}; compute capability ${arch:-?}"
  echo "- driver: ${driver:-?}"
  if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit="$commit + uncommitted changes"
  fi
  echo "- commit: ${commit:-? (no git checkout)}"
  echo "- python: $($PY -c 'import sys; print(sys.version.split()[0])' 2>&1)"
  echo "- torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -n1)"
  echo "- triton: $($PY -c 'import triton; print(triton.__version__)' 2>&1 | tail -n1)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not on PATH')"
} >"$RESULTS"
publish

# --- build ------------------------------------------------------------------------------------
section "Build"
export SLIMRATE_CUDA=1 TORCH_CUDA_ARCH_LIST=${arch:-9.0} MAX_JOBS=16
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
t0=$SECONDS
timeout -k 10 "$(limit 240)" $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
  >"$LOGS/build.log" 2>&1
rc=$?
status_line "pip install -e . (SLIMRATE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" $rc $((SECONDS - t0))
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ]; then
  # pip itself can be what fails (no setuptools editable support, read-only site-packages):
  # build in place instead and import from python/.
  echo "pip log tail:" >>"$RESULTS"
  tail -n 40 "$LOGS/build.log" | fenced
  t0=$SECONDS
  timeout -k 10 "$(limit 240)" $PY setup.py build_ext --inplace >"$LOGS/build_inplace.log" 2>&1
  rc=$?
  status_line "fallback: setup.py build_ext --inplace" $rc $((SECONDS - t0))
  export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
  [ $rc -eq 0 ] || tail -n 60 "$LOGS/build_inplace.log" | fenced
elif [ $rc -ne 0 ]; then
  tail -n 60 "$LOGS/build.log" | fenced
fi
echo "- extension: $($PY -c 'import slimrate._C as c; print("cuda_built =", c.cuda_built)' 2>&1 | tail -n1)" \
  >>"$RESULTS"
publish

# --- tests ------------------------------------------------------------------------------------
section "Tests"
t0=$SECONDS
timeout -k 10 "$(limit 180)" $PY -m pytest -q tests >"$LOGS/tests.log" 2>&1
rc=$?
status_line "pytest -q tests" $rc $((SECONDS - t0))
# The short summary (failures, skips with reasons) and the final count line.
if grep -q "short test summary info" "$LOGS/tests.log"; then
  sed -n '/short test summary info/,$p' "$LOGS/tests.log" | head -n 100 | fenced
else
  tail -n 30 "$LOGS/tests.log" | fenced
fi
publish

# --- the exported ExecuTorch programs (CPU programs: the runner and executorch.runtime on this host's CPU) --------
section "Edge programs (ExecuTorch)"
if ! $PY -c "import executorch" >/dev/null 2>&1; then
  echo "- skipped: executorch is not installed on this machine (no network to install it)" >>"$RESULTS"
elif [ "$(remaining)" -lt 60 ]; then
  echo "- skipped: the time budget is spent" >>"$RESULTS"
else
  t0=$SECONDS
  et_dir=$($PY -c "import executorch; print(executorch.__path__[0])")
  { cmake -S edge -B build/edge -DCMAKE_BUILD_TYPE=Release -DEXECUTORCH_DIR="$et_dir" &&
    cmake --build build/edge -j 16 && cp build/edge/libslimrate_edge.so python/slimrate/edge/ &&
    timeout -k 10 "$(limit 120)" $PY -m pytest -q tests/test_edge.py tests/test_edge_runner.py; } \
    >"$LOGS/edge.log" 2>&1
  status_line "make edge's build, then tests/test_edge.py and tests/test_edge_runner.py" $? $((SECONDS - t0))
  tail -n 15 "$LOGS/edge.log" | fenced
fi
publish

# --- FSDP2 over NCCL (two GPUs): the Trainer with accelerate's FSDP2 plugin, the rate term's cost ----------------
section "FSDP2 (NCCL)"
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$ngpu" -lt 2 ]; then
  echo "- skipped: $ngpu GPU here; FSDP2 over NCCL needs two (make test runs it on 2 CPU processes over gloo)" \
    >>"$RESULTS"
elif [ "$(remaining)" -lt 90 ]; then
  echo "- skipped: the time budget is spent" >>"$RESULTS"
else
  torchrun2=("$PY" -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1)
  t0=$SECONDS
  timeout -k 10 "$(limit 120)" "${torchrun2[@]}" --master_port=29517 bench/trainer_fsdp.py --sharding self >"$LOGS/trainer_fsdp.log" 2>&1
  status_line "Trainer + accelerate FSDP2 + RateConstraintCallback (bench/trainer_fsdp.py --sharding self)" $? \
    $((SECONDS - t0))
  { grep '^trainer_fsdp:' "$LOGS/trainer_fsdp.log" || tail -n 30 "$LOGS/trainer_fsdp.log"; } | fenced
  t0=$SECONDS
  timeout -k 10 "$(limit 180)" "${torchrun2[@]}" --master_port=29518 bench/fsdp_rate_worker.py --out "$LOGS/fsdp.json" --batch 256 \
    >"$LOGS/fsdp_rate.log" 2>&1
  status_line "the rate term under FSDP2, 100.7M parameters (bench/fsdp_rate_worker.py --batch 256)" $? \
    $((SECONDS - t0))
  { cat "$LOGS/fsdp.json" 2>/dev/null || tail -n 30 "$LOGS/fsdp_rate.log"; } | fenced
fi
publish

# --- benchmarks -------------------------------------------------------------------------------
section "Benchmarks (pytest bench --benchmark-only -k cuda)"
if ! $PY -c "import pytest_benchmark" >/dev/null 2>&1; then
  echo "- skipped: pytest-benchmark is not installed on this machine" >>"$RESULTS"
elif [ "$(remaining)" -lt 20 ]; then
  echo "- skipped: the time budget is spent" >>"$RESULTS"
else
  t0=$SECONDS
  timeout -k 10 "$(limit 120)" $PY -m pytest bench -q --benchmark-only -k cuda >"$LOGS/bench.log" 2>&1
  rc=$?
  if [ $rc -eq 5 ]; then
    echo "- no CUDA benchmarks collected (pytest exit 5)" >>"$RESULTS"
  else
    status_line "pytest bench --benchmark-only -k cuda" $rc $((SECONDS - t0))
    # The benchmark table starts at its "benchmark" banner; fall back to the tail of the log.
    if grep -q -- "-- benchmark" "$LOGS/bench.log"; then
      sed -n '/-- benchmark/,$p' "$LOGS/bench.log" | head -n 200 | fenced
    else
      tail -n 40 "$LOGS/bench.log" | fenced
    fi
  fi
fi

publish

# --- DMB at the size of SEDD's small text8 net: learned Q vs frozen at init, SEDD-absorb beside them -------------
section "DMB learned vs frozen Q at the sedd-small size (bench/dmb_sedd_small.py)"
if [ "$(remaining)" -lt 60 ]; then
  echo "- skipped: the time budget is spent" >>"$RESULTS"
else
  t0=$SECONDS
  # 300 steps per arm on the GPU, meant to fit ~3 minutes on an H100 for the three arms (an estimate, not yet
  # measured: 92M parameters at batch 32 × 64 tokens is ~1.1 TFLOP a step, ~0.1 s at fp32 rates, plus the CPU
  # initialisation of each net and the evaluations)
  timeout -k 10 "$(limit 200)" $PY bench/dmb_sedd_small.py --device cuda --steps 300 --out "$LOGS" \
    >"$LOGS/dmb_sedd_small.log" 2>&1
  status_line "bench/dmb_sedd_small.py --device cuda --steps 300 (sedd-small preset, 1 seed)" $? $((SECONDS - t0))
  { cat "$LOGS/dmb_sedd-small.md" 2>/dev/null || tail -n 30 "$LOGS/dmb_sedd_small.log"; } | fenced
fi

echo >>"$RESULTS"
echo "Total: $((SECONDS - START_S)) s" >>"$RESULTS"
publish
echo "wrote $RESULTS"
