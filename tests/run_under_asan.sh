#!/usr/bin/env bash
# Builds the C++ extension with AddressSanitizer in a scratch copy of the repository and runs the
# op tests against it, so that an out-of-bounds read or write in csrc/ stops the run with a report.
#
#     bash tests/run_under_asan.sh [extra pytest arguments]
#
# Needs gcc or clang with libasan. The installed package is not touched. Python itself is not
# instrumented, so libasan is preloaded; leak checking is off (the interpreter never frees some
# of its memory).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# The instrumented build is kept in DKM_ASAN_DIR (a fresh temporary folder by default).
scratch="${DKM_ASAN_DIR:-$(mktemp -d)}"
[ -n "${DKM_ASAN_DIR:-}" ] || trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch"
cp -r "$repo/setup.py" "$repo/README.md" "$repo/csrc" "$repo/dkm_kernels" "$repo/tests" "$scratch/"
cd "$scratch"
DKM_KERNELS_SANITIZE=address python setup.py -q build_ext --inplace --force >build.log 2>&1 || {
    cat build.log; exit 1; }
# libstdc++ is preloaded too, so that ASan finds the C++ exception functions it intercepts.
libasan="$(${CXX:-c++} -print-file-name=libasan.so)"
export LD_PRELOAD="$libasan $(${CXX:-c++} -print-file-name=libstdc++.so)" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
python -m pytest -q -p no:cacheprovider tests/test_cpu_backend.py tests/test_cpu_ragged.py tests/test_cpu_numerics.py \
    tests/test_op_contract.py tests/test_backends.py -k "cpu or op or contract or numerics" "$@"
