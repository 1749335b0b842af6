#!/usr/bin/env bash
# One call on a lent GPU machine: build, test, benchmark, everything written under $OUT.
#
#   on the machine:  DKM_COMMIT=<hash> bash benchmarks/gpu_session.sh
#   here, first:     bash benchmarks/gpu_session.sh --self-check   (no GPU: every step's command
#                    runs at tiny sizes on the CPU, Triton interpreted; catches typos, times nothing)
#
# Steps run in order of value (correctness, then the op's cases, then whole models); each has its
# own time limit, and a step that would overrun the session's budget (SESSION_SECONDS, 420 by
# default: 7 minutes) is skipped and listed as such. The machine's own python3 (its torch and
# Triton) is used; the C++ extension is built against it. Results: $OUT/*.json, each step's log,
# $OUT/steps.txt (exit status and seconds per step) and $OUT/summary.md (the tables).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
SELF_CHECK=0
[ "${1:-}" = "--self-check" ] && SELF_CHECK=1
# The self-check's interpreted steps are slower than the device's: its budget is larger.
BUDGET=${SESSION_SECONDS:-$(( SELF_CHECK ? 1200 : 420 ))}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
mkdir -p "$OUT"
: > "$OUT/steps.txt"

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local now; now=$(date +%s)
    if (( now - START + limit > BUDGET )); then
        echo "$name skipped: ${limit}s would pass the ${BUDGET}s budget" | tee -a "$OUT/steps.txt"
        return
    fi
    echo "== $name ($(date -u +%T), limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$? took=$(( $(date +%s) - now ))
    echo "$name rc=$rc ${took}s" | tee -a "$OUT/steps.txt"
    tail -n 4 "$OUT/$name.log"
}

step environment 30 bash -c "nvidia-smi; $PYTHON -c 'import torch, triton, sys; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__)'"
step build 150 "$PYTHON" setup.py build_ext --inplace

if (( SELF_CHECK )); then
    step tests 300 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_triton_backend.py
    step op_cases 300 "$PYTHON" benchmarks/gpu_bench.py --self-check
    step resnet50_step 300 "$PYTHON" benchmarks/resnet50.py --help
else
    step tests 170 "$PYTHON" -m pytest -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" \
        tests/test_triton_backend.py tests/test_op_contract.py tests/test_memory.py tests/test_backends.py \
        tests/test_many.py tests/test_triton_capture.py
    step op_cases 150 "$PYTHON" benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json"
    # per layer and in one dkm_many call (the ragged passes: launches per pass, CUDA-graph
    # captures of the forward's iterations and of the whole forward+backward, reported and never
    # fatal)
    step resnet50_clustering 90 "$PYTHON" benchmarks/gpu_bench.py --resnet50 \
        --backends torch,triton,triton-deterministic --out "$OUT/gpu_resnet50_clustering.json"
    for batch in 64 256; do
        step "resnet50_uncompressed_b$batch" 40 "$PYTHON" benchmarks/resnet50.py --device cuda \
            --batch "$batch" --steps 4 --uncompressed --out "$OUT/resnet50_uncompressed_b$batch.json"
        step "resnet50_8of8_b$batch" 60 "$PYTHON" benchmarks/resnet50.py --device cuda \
            --batch "$batch" --steps 4 --out "$OUT/resnet50_8of8_b$batch.json"
    done
fi

{
    echo "# GPU session $(date -u +%FT%TZ), commit ${DKM_COMMIT:-unknown}"
    echo; echo '```'; cat "$OUT/steps.txt"; echo '```'
    echo; echo "## tests"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
    echo; echo "## op cases"; grep -E "^\|" "$OUT/op_cases.log"
    for log in "$OUT"/resnet50_*.log; do
        [ -e "$log" ] || continue
        echo; echo "## $(basename "$log" .log)"; grep -vE "it/s\]|s/it\]|^\s*$" "$log" | tail -n 6
    done
} > "$OUT/summary.md" 2>/dev/null
cat "$OUT/summary.md"
