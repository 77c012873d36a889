#!/usr/bin/env bash
# The whole GPU acceptance of kdfast in one command, within 8 minutes of wall time:
#   1. the Triton tests on CUDA tensors (TRITON_INTERPRET unset): the backend matrix, DIST/DKD/correlation,
#      errors and edge cases, fused linear and top-k on the device with a process group of one rank
#      (tests/test_gpu_session.py's on_device tests), then the rest (determinism, compile, properties,
#      top-k); capped at --tests-cap-s, the log saved;
#   2. benchmarks/bench_gpu.py: kdfast vs Liger-Kernel vs torch.compile vs eager PyTorch, forward+backward
#      medians with CUDA events, peak memory, the copy-bandwidth roofline, value agreement and the
#      acceptance checks, under what is left of the session's time;
#   3. in OUT_DIR: gpu-session.json, gpu-session.md (printed at the end), pytest.txt, session.log.
#
# Usage, from anywhere in the repository:
#   bash benchmarks/gpu_session.sh [--dry-run] [--session-s S] [--tests-cap-s S] [--budget-s S] [OUT_DIR]
#                                  [-- bench_gpu.py arguments, e.g. --cases dist dkd --runs 10]
# OUT_DIR: default $OUT when set (the device machine's folder that comes back), else
# benchmarks/results/gpu-session-<date>-<time>.
#   --session-s S    the whole script's wall-time limit (default 450: 7.5 minutes)
#   --tests-cap-s S  the tests' share of it (default 150; dry run 60; 0 skips the tests)
#   --budget-s S     the benchmark's budget (default: what is left after the tests, less a 45 s grace
#                    for the case in flight and the report; the benchmark is killed at budget + grace)
#
# The GPU machine: Python 3.12, torch 2.11 (CUDA), triton 3.6.0, no network.  Liger-Kernel travels as a
# wheel in .whl/ (untracked and not ignored, so the device tool carries it); prepare it on a CPU machine,
# from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
# This script installs every .whl/*.whl with `pip install --no-index --no-deps --target /tmp/site` and puts
# /tmp/site on PYTHONPATH (KDFAST_SITE overrides the folder).  Without the wheel the Liger columns read n/a.
# The C++ extension is not built there (KDFAST_DISABLE_EXTENSION=1): the CPU tests skip, nothing here
# needs it.
#
# --dry-run: the very same steps on this CPU machine, so the kit cannot rot between GPU sessions: a tiny
# test subset and tiny shapes (8x300; fused linear 16x32x48x300) on CPU tensors, the Triton kernels
# through the interpreter (TRITON_INTERPRET=1).  Works with any triton the tests work with.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

dry_run=0 session_s=450 tests_cap_s="" budget_s="" out="" bench_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; bench_args=("$@"); break ;;
        --dry-run) dry_run=1 ;;
        --session-s) session_s=$2; shift ;;
        --tests-cap-s) tests_cap_s=$2; shift ;;
        --budget-s) budget_s=$2; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_session.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
out="${out:-${OUT:-benchmarks/results/gpu-session-$(date +%F-%H%M%S)}}"
mkdir -p "$out"
log="$out/session.log"
: > "$log"
grace=45

say() { echo "# $*" | tee -a "$log"; }
left() { echo $((session_s - (SECONDS - start))); }
at_most() { local a=$1 b=$2; a=$(( a < b ? a : b )); echo $(( a > 1 ? a : 1 )); }  # min(a, b), at least 1 s

export PYTHONUNBUFFERED=1 KDFAST_DISABLE_EXTENSION=1
site="${KDFAST_SITE:-/tmp/site}"
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry_run" = 1 ]; then
    export TRITON_INTERPRET=1
    tests_cap_s="${tests_cap_s:-60}"
    # one case per divergence of the backend matrix, DIST, DKD, top-k, and the on-device tests
    subset="on_device or test_topk and k_equal_to_V and kl-renormalize or triton and float32 and ("
    subset+="test_kernel_matches_reference and batchmean and soft and None"
    subset+=" or test_dist_kernel_matches_reference and 33-300 or test_dkd_kernel_matches_reference and 8-10)"
    tests=(-k "$subset" tests/test_gpu_session.py tests/test_backend_matrix.py tests/test_correlation_losses.py tests/test_topk.py)
else
    unset TRITON_INTERPRET
    tests_cap_s="${tests_cap_s:-150}"
    # the device's own tests first, the long matrix next, the CPU-only top-k file last (all under the cap)
    tests=(-k "triton or on_device or test_topk"
           tests/test_gpu_session.py tests/test_correlation_losses.py tests/test_errors.py tests/test_edge_cases.py
           tests/test_backend_matrix.py tests/test_determinism.py tests/test_compile.py tests/test_properties.py
           tests/test_topk.py)
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing $(ls .whl/*.whl | tr '\n' ' ')into $site"
    python3 -m pip install --quiet --no-index --no-deps --upgrade --target "$site" .whl/*.whl >> "$log" 2>&1 \
        || say "pip could not install the wheels (see above); Liger-Kernel will be missing"
fi
if [ "$dry_run" = 0 ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>&1
fi
python3 -c "import sys, torch, triton, kdfast; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'kdfast backends', kdfast.available_backends())" 2>&1 | tee -a "$log"

# 1. the tests, capped (SIGINT: pytest stops and still prints its summary of what ran)
tests_report=()
if [ "$tests_cap_s" = 0 ]; then
    tests_rc=0
    say "tests skipped (--tests-cap-s 0)"
else
    cap=$(at_most "$tests_cap_s" $(( $(left) - 60 )))
    say "tests (cap ${cap} s): pytest ${tests[*]}"
    timeout -s INT -k 15 "$cap" python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
        "${tests[@]}" > "$out/pytest.txt" 2>&1
    tests_rc=$?
    tail -3 "$out/pytest.txt" | tee -a "$log"
    [ "$tests_rc" = 124 ] && say "the tests reached their ${cap} s cap (see pytest.txt for what ran)"
    tests_report=(--tests-log "$out/pytest.txt" --tests-exit-code "$tests_rc" --tests-cap-s "$cap")
fi

# 2. the benchmark, under the rest of the session's time
budget_s="${budget_s:-$(( $(left) - grace ))}"
hard=$(at_most $(( ${budget_s%.*} + grace )) "$(left)")
say "benchmark (budget ${budget_s} s; killed after ${hard} s at the latest)"
[ "$dry_run" = 1 ] && bench_args=(--dry-run ${bench_args[@]+"${bench_args[@]}"})
timeout -s TERM -k 10 "$hard" python3 benchmarks/bench_gpu.py --out-dir "$out" --budget-s "$budget_s" \
    ${tests_report[@]+"${tests_report[@]}"} ${bench_args[@]+"${bench_args[@]}"} 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

# 3. the summary: bench_gpu.py prints it when it ends normally; it is on disk after every case
if [ "$bench_rc" != 0 ]; then
    if [ -f "$out/gpu-session.md" ]; then cat "$out/gpu-session.md"; else say "the benchmark wrote no report"; fi
fi
say "tests exit code ${tests_rc}, benchmark exit code ${bench_rc}, $((SECONDS - start)) s; files in ${out}:"
ls "$out" | tee -a "$log"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
