#!/usr/bin/env bash
# Issue 15's GPU check, in ONE command on a machine with an NVIDIA GPU, CuPy and PyTorch (CUDA):
#
#     bash benchmarks/gpu_check.sh            # results in $OUT/gpu_check/ ($OUT defaults to /tmp/gpu_check_out)
#     GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh    # dry run of the same script on the CPU, tiny shapes
#
# Parts, each in its own process with its own time limit, all inside a 270 s budget (a part that
# fails or times out is recorded in summary.txt and the next one runs; nothing here stops early):
#   env              versions, the GPU, the commit                                  -> env.txt
#   parity           lstmkit on cuda vs torch.nn on cuda, values and all gradients,
#                    float64 to 1e-10, float32 to rtol 2e-4 / atol 2e-5, TF32 off,
#                    plus 5 SGD steps of a 2-layer LSTM on cuda vs on the CPU        -> parity.jsonl
#   parity_reference the same (quick grid) with LSTMKIT_REFERENCE=1: functional.py on CuPy -> parity_reference.jsonl
#   bench_*          each library alone in its own process: training step at (100,64,512,512,1),
#                    (50,50,512,512,2), (100,256,1024,1024,2) and batch-1 generation tokens/s,
#                    TF32 off; then the training steps with TF32 on                  -> bench_*.jsonl
#   pytest_gpu       tests/test_gpu.py (its GPU tests, and the CPU ones where g++ is there)
#   results.md       the benchmark table (lstmkit next to torch) and the parity counts
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
R="$OUT/gpu_check"
mkdir -p "$R"
PY=${PYTHON:-}
if [[ -z $PY ]]; then       # the interpreter that has torch and CuPy, if there is one
    for c in python3 python; do
        if command -v "$c" > /dev/null && "$c" -c "import torch, cupy" 2> /dev/null; then PY=$c; break; fi
    done
fi
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LSTMKIT_CACHE_DIR=${LSTMKIT_CACHE_DIR:-/tmp/lstmkit_jit_cache}   # Numba's cache: not in $OUT
unset CUPY_TF32
DEV=${GPU_CHECK_DEVICE:-cuda}
QUICK=()
[[ $DEV == cpu ]] && QUICK=(--quick --tokens 20)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-270}
: > "$R/summary.txt"

# part NAME LIMIT_S COMMAND...: run COMMAND with its output in NAME.log, at most LIMIT_S seconds
# and never past the budget; its exit status and time go to summary.txt.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$(( START + BUDGET - $(date +%s) ))
    if (( left < 10 )); then
        echo "$name: SKIPPED (budget spent)" | tee -a "$R/summary.txt"
        return
    fi
    (( limit > left )) && limit=$left
    local t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$R/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    (( rc == 124 || rc == 137 )) && verdict="TIMEOUT after ${limit}s"
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED (rc $rc)"
    echo "$name: $verdict, $(( $(date +%s) - t0 ))s" | tee -a "$R/summary.txt"
}

env_info() {
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
    "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "numba", "cupy", "torch", "pytest"):
    try:
        m = importlib.import_module(name)
        print(name, m.__version__)
    except Exception as e:
        print(name, "MISSING:", e)
try:
    import torch
    print("torch cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available())
    import cupy
    print("cupy cuda runtime", cupy.cuda.runtime.runtimeGetVersion(), "devices", cupy.cuda.runtime.getDeviceCount())
except Exception as e:
    print("probe failed:", e)
EOF
}

export -f env_info
export PY
part env 20 bash -c env_info
cp "$R/env.log" "$R/env.txt" 2>/dev/null
part parity 75 "$PY" benchmarks/gpu_parity.py --device "$DEV" --out "$R/parity.jsonl"
part parity_reference 30 "$PY" benchmarks/gpu_parity.py --device "$DEV" --quick --reference --out "$R/parity_reference.jsonl"
part bench_lstmkit_tf32off 60 "$PY" benchmarks/gpu_bench.py --device "$DEV" "${QUICK[@]}" --lib lstmkit --tf32 off --out "$R/bench_lstmkit_tf32off.jsonl"
part bench_torch_tf32off 45 "$PY" benchmarks/gpu_bench.py --device "$DEV" "${QUICK[@]}" --lib torch --tf32 off --out "$R/bench_torch_tf32off.jsonl"
part bench_lstmkit_tf32on 30 env CUPY_TF32=1 "$PY" benchmarks/gpu_bench.py --device "$DEV" "${QUICK[@]}" --lib lstmkit --tf32 on --kinds train --out "$R/bench_lstmkit_tf32on.jsonl"
part bench_torch_tf32on 30 "$PY" benchmarks/gpu_bench.py --device "$DEV" "${QUICK[@]}" --lib torch --tf32 on --kinds train --out "$R/bench_torch_tf32on.jsonl"
part pytest_gpu 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py

{
    echo "# GPU check $(date -u +%FT%TZ)"
    echo
    echo '```'
    cat "$R/env.txt" 2>/dev/null
    echo '```'
    echo
    echo "## Parts"
    echo '```'
    cat "$R/summary.txt"
    echo '```'
    echo
    echo "## Parity (last line of each file: passed / failed)"
    echo '```'
    tail -n 1 "$R/parity.jsonl" "$R/parity_reference.jsonl" 2>&1
    grep -h '"ok": false' "$R"/parity*.jsonl 2>/dev/null | cut -c1-400
    echo '```'
    echo
    echo "## Speed (medians; CUDA events)"
    "$PY" benchmarks/gpu_bench.py --summarize "$R" 2>&1
    echo
    echo "## pytest"
    echo '```'
    tail -n 15 "$R/pytest_gpu.log" 2>/dev/null
    echo '```'
} > "$R/results.md"
cat "$R/results.md"
echo "total $(( $(date +%s) - START ))s; files in $R"
