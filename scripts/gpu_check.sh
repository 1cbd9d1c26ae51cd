#!/usr/bin/env bash
# The GPU check (issue 19): the CUDA tests, one short bf16 run of each training stage, and bf16 throughput at
# Qwen2.5-0.5B shapes, on a bare GPU machine in under 8 minutes. Results: $OUT/gpu_check.json and
# $OUT/gpu_check.log (OUT defaults to ./gpu_check_out). See benchmarks/README.md, "GPU check".
#
#   scripts/gpu_check.sh                # on the GPU machine (installs .whl/*.whl into /tmp/site first)
#   scripts/gpu_check.sh --cpu          # dry run on the CPU: tiny sizes, no wheels, CUDA tests skipped
#   scripts/gpu_check.sh --budget 300   # a shorter global budget (seconds; default 450 on GPU, 400 with --cpu)
#
# Environment: PYTHON (default: python3), OUT, WHEELS (default: .whl), SITE (default: /tmp/site).
# The machine's installation is never touched: the wheels (fla-core, flash-linear-attention) go to $SITE with
# --no-deps and come first on PYTHONPATH, and wuneng is imported from src/ (no pip install of wuneng). A
# transformers wheel put in .whl too would shadow the machine's transformers the same way.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/gpu_check_out}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$REPO/.whl}
SITE=${SITE:-/tmp/site}
CPU=0
for arg in "$@"; do
    if [ "$arg" = "--cpu" ]; then CPU=1; fi
done
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
say() { echo "[gpu_check.sh] $*" | tee -a "$LOG"; }

# the machine's own versions, before the carried wheels shadow any of them
MACHINE_VERSIONS=$("$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")' 2>&1 | tail -1)
say "machine: $MACHINE_VERSIONS"
WHEEL_STATUS="none: no $WHEELS/*.whl"
if [ "$CPU" = 1 ]; then
    WHEEL_STATUS="skipped: --cpu"
elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (--no-deps)"
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        WHEEL_STATUS="installed: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        WHEEL_STATUS="failed: pip install exited non-zero (see the log)"
    fi
fi
say "wheels: $WHEEL_STATUS"
# src first: this checkout's wuneng, whatever else is installed
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export GPU_CHECK_WHEELS="$WHEEL_STATUS"
export GPU_CHECK_MACHINE_VERSIONS="$MACHINE_VERSIONS"
# Triton's compiled kernels and autotuning results are reused by the later sections (separate processes)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/gpu_check_triton}
export TRITON_CACHE_AUTOTUNING=1
# torch.cuda.is_available() through NVML: it then leaves the CUDA driver uninitialised (fork-safe)
export PYTORCH_NVML_BASED_CUDA_CHECK=1
"$PYTHON" "$REPO/scripts/gpu_check.py" --out "$OUT" "$@"
rc=$?
say "exit $rc; results in $OUT/gpu_check.json"
exit $rc
