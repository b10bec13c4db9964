#!/usr/bin/env bash
# fastseq GPU check: everything a machine with a GPU owes the project, in one run of at most 10 minutes.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root; writes under $OUT (default ./out)
#
# Steps (each logged to $OUT/logs/<step>.log; a failing step does not stop the others):
#   versions   python/torch/triton/CUDA versions, nvcc, nvidia-smi, git state          -> versions.log
#   install    pip install --no-build-isolation --no-deps --no-index . (builds fastseq._C
#              where setup.py can; nothing is downloaded)                               -> install.log
#   import     which fastseq is imported, fastseq.backends()                            -> import.log
#   tests      python -m pytest tests -m cuda (junit: pytest_cuda.xml; "no tests ran" is
#              not a failure)                                                           -> tests.log
#   sanitize   compute-sanitizer --tool memcheck, then --tool racecheck, over
#              benchmarks/cuda_sanitize.py (every CUDA kernel once, tiny shapes, both
#              layer paths); SKIP where compute-sanitizer is not found         -> sanitize_{memcheck,racecheck}.log
#   check      python -m fastseq check                                                  -> check.txt
#   bench      python -m fastseq bench --preset gpu (cells eager and CUDA graph, layers
#              padded and packed, attention), with what time is left                   -> $OUT/bench/
# Then $OUT/summary.txt lists every step's status; the exit status is non-zero if any step failed. At the end
# the logs are packed into $OUT/logs.tar.gz (the device tool brings back at most 8 files), so $OUT holds:
# summary.txt, logs.tar.gz, bench/results.json, bench/results.md, bench/speedup.png. Back on the development
# machine: commit bench/ under benchmarks/results/, then
#   python -m fastseq bench --from-results benchmarks/results/<run>/results.json --record-crossovers
# records the measured crossovers that backend="auto" follows.
#
# After a successful install the Python steps run from a scratch directory, so that `import fastseq` is the
# installed package (with its compiled extension), not the checkout's fastseq/ folder, which shadows it when
# Python runs from the repository root. If the install fails they run on the checkout (PYTHONPATH).
#
# Environment:
#   OUT                    output folder (default ./out)
#   PYTHON                 interpreter (default: python, else python3)
#   GPU_CHECK_SMOKE=1      the same steps on CPU with tiny shapes under TRITON_INTERPRET=1, no nvidia-smi and
#                          no install (unless GPU_CHECK_INSTALL=1); proves the script on a machine without GPU
#   GPU_CHECK_INSTALL=0/1  force the install step off/on (default: on, off in smoke mode)
#   GPU_CHECK_TIME_LIMIT   seconds for the whole run (default 570); each step gets what is left, capped
#                          (versions 60, install 300, import 120, tests 180, check 90, bench: the rest)
#   GPU_CHECK_TESTS_TIMEOUT  cap of the tests step in seconds (default 180)
#   GPU_CHECK_SANITIZE_TIMEOUT  cap of each sanitizer run in seconds (default 90)
#   GPU_CHECK_BENCH_ARGS   extra arguments for python -m fastseq bench (appended, so they override the defaults)
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST   for the extension build (defaults: nproc; the GPU's own arch)

set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUT="${OUT:-./out}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
SMOKE="${GPU_CHECK_SMOKE:-0}"
[ "$SMOKE" = "0" ] && DEFAULT_INSTALL=1 || DEFAULT_INSTALL=0
INSTALL="${GPU_CHECK_INSTALL:-$DEFAULT_INSTALL}"
TIME_LIMIT="${GPU_CHECK_TIME_LIMIT:-570}"
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
START=$(date +%s)
LOG="$LOGS/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
STATUS_LINES=()
FAILED=0

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
if [ "$SMOKE" != "0" ]; then
    export TRITON_INTERPRET=1
fi

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
left() { echo $((TIME_LIMIT - ($(date +%s) - START))); }

# record NAME STATUS RC SECONDS NOTE
record() {
    STATUS_LINES+=("$(printf '%-9s %-5s rc=%-4s %5ss  %s' "$1" "$2" "$3" "$4" "$5")")
    [ "$2" = "FAIL" ] && FAILED=1
    say "step $1: $2 (rc=$3, $4 s) $5"
}

# run_step NAME CAP_SECONDS LOGFILE CMD...: runs CMD with a timeout of min(CAP, time left - 10 s).
# Sets RC and SECS. A step that cannot start for lack of time gets RC=124.
run_step() {
    local name="$1" cap="$2" logfile="$3"
    shift 3
    local budget=$(( $(left) - 10 ))
    [ "$budget" -gt "$cap" ] && budget="$cap"
    local t0
    t0=$(date +%s)
    if [ "$budget" -lt 5 ]; then
        echo "no time left for step $name" >"$logfile"
        RC=124; SECS=0
        return
    fi
    say "step $name: start (timeout ${budget}s) -> ${logfile#"$OUT"/}"
    # SIGINT first: pytest then still reports and writes its junit file, the bench keeps the cases it wrote.
    timeout --signal=INT --kill-after=20 "$budget" "$@" >"$logfile" 2>&1
    RC=$?
    SECS=$(( $(date +%s) - t0 ))
}

timeout_note() { [ "$1" = "124" ] || [ "$1" = "137" ] && echo "timed out; " || true; }

say "repo $REPO, out $OUT, python $PYTHON, smoke=$SMOKE, install=$INSTALL, time limit ${TIME_LIMIT}s"

# ---------------------------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------------------------
# shellcheck disable=SC2329  # run through bash -c (export -f)
versions() {
    echo "== date"; date -u
    echo "== host"; uname -a
    echo "== python"; command -v "$PYTHON"; "$PYTHON" -VV
    echo "== packages"
    "$PYTHON" - <<'EOF'
import importlib, sys
for name in ("torch", "triton", "numpy", "pytest", "setuptools", "wheel", "ninja", "pybind11"):
    try:
        m = importlib.import_module(name)
        print(f"{name:11s} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name:11s} MISSING ({type(e).__name__}: {e})")
import torch
print("torch.version.cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}: {p.name} cc {p.major}.{p.minor} SMs {p.multi_processor_count} "
              f"mem {p.total_memory / 2**30:.1f} GiB")
from torch.utils import cpp_extension
print("CUDA_HOME (torch)", cpp_extension.CUDA_HOME)
EOF
    echo "== nvcc"; if command -v nvcc; then nvcc --version; else echo "nvcc not on PATH"; fi
    echo "== c++"; if command -v "${CXX:-c++}"; then "${CXX:-c++}" --version | head -1; else echo "no C++ compiler"; fi
    echo "== selected environment"
    for v in CUDA_HOME CUDA_VISIBLE_DEVICES TORCH_CUDA_ARCH_LIST MAX_JOBS TRITON_INTERPRET TRITON_CACHE_DIR \
             FASTSEQ_NO_EXTENSION FASTSEQ_NO_CUDA PYTHONPATH VIRTUAL_ENV CONDA_PREFIX; do
        echo "$v=${!v-<unset>}"
    done
    echo "== git"
    if git -C "$REPO" rev-parse HEAD 2>/dev/null; then git -C "$REPO" status --short | head -50; else echo "not a git checkout"; fi
    if [ "$SMOKE" = "0" ]; then
        echo "== nvidia-smi"
        nvidia-smi || return 1
        nvidia-smi --query-gpu=name,pci.bus_id,driver_version,power.limit,clocks.max.sm,clocks.max.mem,memory.total,compute_mode,mig.mode.current --format=csv || true
    else
        echo "== nvidia-smi: skipped (GPU_CHECK_SMOKE)"
    fi
}
export -f versions
export PYTHON SMOKE REPO
run_step versions 60 "$LOGS/versions.log" bash -c versions
if [ "$RC" = 0 ]; then record versions PASS "$RC" "$SECS" "versions.log"
else record versions FAIL "$RC" "$SECS" "$(timeout_note $RC)versions.log (nvidia-smi or python failed)"; fi

# ---------------------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------------------
USE_INSTALLED=0
if [ "$INSTALL" != "0" ]; then
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        ARCH=$("$PYTHON" -c "import torch; p = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{p[0]}.{p[1]}' if p else '')" 2>/dev/null)
        [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST="$ARCH"
    fi
    say "install: MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>}"
    PIP_ARGS=(-m pip install --no-build-isolation --no-deps --no-index -v "$REPO")
    run_step install 300 "$LOGS/install.log" "$PYTHON" "${PIP_ARGS[@]}"
    NOTE="install.log"
    if [ "$RC" != 0 ] && grep -q "externally-managed-environment" "$LOGS/install.log"; then
        # A distribution's Python (PEP 668) refuses; this machine is throwaway, so install anyway.
        say "install: externally managed Python; retrying with --break-system-packages"
        cp "$LOGS/install.log" "$LOGS/install_first_try.log"
        run_step install 300 "$LOGS/install.log" "$PYTHON" "${PIP_ARGS[@]}" --break-system-packages
        NOTE="install.log (with --break-system-packages)"
    fi
    if [ "$RC" = 0 ]; then
        USE_INSTALLED=1
        grep -E "fastseq setup:" "$LOGS/install.log" | sed 's/^ *//' | sort -u | sed 's/^/    /' | tee -a "$LOG"
        record install PASS "$RC" "$SECS" "$NOTE"
    else
        record install FAIL "$RC" "$SECS" "$(timeout_note $RC)$NOTE; the next steps use the checkout"
    fi
else
    record install SKIP - 0 "GPU_CHECK_INSTALL=0 or smoke mode: the next steps use the checkout"
fi

# Where the Python steps run: a scratch folder (installed package) or the checkout via PYTHONPATH.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastseq_gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [ "$USE_INSTALLED" = 1 ]; then
    unset PYTHONPATH
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------------------------------------------------
# import: which fastseq, which backends
# ---------------------------------------------------------------------------------------------------------
cat >"$WORK/import_check.py" <<'PYEOF'
import json

import fastseq

print("fastseq", fastseq.__version__, "from", fastseq.__file__)
try:
    import fastseq._C as C

    print("fastseq._C", C.__file__, "built_with_cuda", C.built_with_cuda(), "torch", C.torch_version,
          "kernels cpu", C.kernels("cpu"), "kernels cuda", C.kernels("cuda"))
except ImportError as e:
    print("fastseq._C not importable:", e)
print(json.dumps(fastseq.backends(), indent=1))
PYEOF
run_step import 120 "$LOGS/import.log" bash -c "cd '$WORK' && '$PYTHON' import_check.py"
if [ "$RC" = 0 ]; then
    record import PASS "$RC" "$SECS" "$(grep -m1 '^fastseq ' "$LOGS/import.log")"
else
    record import FAIL "$RC" "$SECS" "$(timeout_note $RC)import.log"
fi

# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------
if "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
    run_step tests "${GPU_CHECK_TESTS_TIMEOUT:-180}" "$LOGS/tests.log" bash -c "cd '$WORK' && '$PYTHON' -m pytest '$REPO/tests' -m cuda -q \
        -p no:cacheprovider --junitxml='$LOGS/pytest_cuda.xml'"
    TAIL="$(grep -E '(passed|failed|error|skipped|no tests ran)' "$LOGS/tests.log" | tail -1)"
    if [ "$RC" = 0 ]; then record tests PASS "$RC" "$SECS" "$TAIL"
    elif [ "$RC" = 5 ]; then record tests PASS "$RC" "$SECS" "no tests ran (exit 5, tolerated): $TAIL"
    else record tests FAIL "$RC" "$SECS" "$(timeout_note $RC)$TAIL"; fi
else
    record tests FAIL - 0 "pytest is not importable by $PYTHON (no internet to install it)"
fi

# ---------------------------------------------------------------------------------------------------------
# sanitize: every CUDA kernel once under compute-sanitizer (memcheck: out-of-bounds and misaligned accesses,
# racecheck: shared-memory hazards between the threads of a block)
# ---------------------------------------------------------------------------------------------------------
find_sanitizer() {
    command -v compute-sanitizer 2>/dev/null && return
    local c
    for c in "${CUDA_HOME:-}/bin/compute-sanitizer" "${CUDA_HOME:-}/compute-sanitizer/compute-sanitizer" \
             /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        [ -x "$c" ] && { echo "$c"; return; }
    done
    local nvcc_dir
    nvcc_dir="$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/x)")"
    for c in "$nvcc_dir/compute-sanitizer" "$nvcc_dir/../compute-sanitizer/compute-sanitizer"; do
        [ -x "$c" ] && { echo "$c"; return; }
    done
}
SANITIZER="$(find_sanitizer)"
if [ "$SMOKE" != "0" ]; then
    run_step sanitize 60 "$LOGS/sanitize_memcheck.log" bash -c "cd '$WORK' && '$PYTHON' '$REPO/benchmarks/cuda_sanitize.py'"
    if [ "$RC" = 0 ]; then record sanitize PASS "$RC" "$SECS" "smoke: the script alone, no sanitizer"
    else record sanitize FAIL "$RC" "$SECS" "$(timeout_note $RC)sanitize_memcheck.log"; fi
elif [ -z "$SANITIZER" ]; then
    record sanitize SKIP - 0 "compute-sanitizer not found (PATH, \$CUDA_HOME, /usr/local/cuda)"
else
    NOTE=""
    SAN_RC=0
    for tool in memcheck racecheck; do
        run_step sanitize "${GPU_CHECK_SANITIZE_TIMEOUT:-90}" "$LOGS/sanitize_$tool.log" bash -c "cd '$WORK' && \
            '$SANITIZER' --tool $tool --error-exitcode 3 '$PYTHON' '$REPO/benchmarks/cuda_sanitize.py'"
        NOTE="$NOTE$tool rc=$RC ${SECS}s $(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/sanitize_$tool.log" || true); "
        [ "$RC" != 0 ] && SAN_RC="$RC"
    done
    if [ "$SAN_RC" = 0 ]; then record sanitize PASS 0 "-" "$NOTE"
    else record sanitize FAIL "$SAN_RC" "-" "$(timeout_note $SAN_RC)$NOTE"; fi
fi

# ---------------------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------------------
run_step check 90 "$LOGS/check.txt" bash -c "cd '$WORK' && '$PYTHON' -m fastseq check"
if [ "$RC" = 0 ]; then
    record check PASS "$RC" "$SECS" "check.txt"
elif grep -q "No module named fastseq.__main__\|cannot be directly executed" "$LOGS/check.txt"; then
    record check FAIL "$RC" "$SECS" "fastseq has no command line yet (no fastseq/__main__.py)"
else
    record check FAIL "$RC" "$SECS" "$(timeout_note $RC)check.txt"
fi

# ---------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------
if [ "$SMOKE" = "0" ]; then
    BENCH_ARGS=(--preset gpu --device cuda)
else
    BENCH_ARGS=(--preset tiny --device cpu --min-time 0.005 --rounds 1)
fi
# The bench stops starting cases when its budget is spent (skipped cases are listed); keep 40 s for writing.
BENCH_BUDGET=$(( $(left) - 60 ))
[ "$BENCH_BUDGET" -lt 10 ] && BENCH_BUDGET=10
# shellcheck disable=SC2206
EXTRA=(${GPU_CHECK_BENCH_ARGS:-})
run_step bench 600 "$LOGS/bench.log" bash -c "cd '$WORK' && '$PYTHON' -m fastseq bench ${BENCH_ARGS[*]} \
    --no-progress --time-budget $BENCH_BUDGET --out '$OUT/bench' ${EXTRA[*]:-}"
TAIL="$(grep -E '^wrote ' "$LOGS/bench.log" | tail -1)"
if [ "$RC" = 0 ]; then record bench PASS "$RC" "$SECS" "$TAIL"
else record bench FAIL "$RC" "$SECS" "$(timeout_note $RC)$(tail -1 "$LOGS/bench.log")"; fi

# ---------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
{
    echo "fastseq gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)  smoke=$SMOKE  total ${TOTAL}s  (limit ${TIME_LIMIT}s)"
    echo "repo $REPO @ $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$( [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ] && echo '+dirty')"
    echo "fastseq used: $([ "$USE_INSTALLED" = 1 ] && echo installed package || echo checkout via PYTHONPATH)"
    echo
    for line in "${STATUS_LINES[@]}"; do echo "$line"; done
    echo
    if [ "$FAILED" = 0 ]; then echo "OVERALL: PASS"; else echo "OVERALL: FAIL"; fi
    echo "logs (in logs.tar.gz): versions.log install.log import.log tests.log pytest_cuda.xml sanitize_{memcheck,racecheck}.log check.txt bench.log gpu_check.log"
    echo "bench: bench/results.md bench/results.json bench/speedup.png"
} >"$SUMMARY"
cat "$SUMMARY" | tee -a "$LOG"
# The device tool brings back at most 8 files from $OUT: the logs travel as one archive.
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$LOGS"
exit "$FAILED"
