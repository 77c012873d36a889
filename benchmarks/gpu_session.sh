#!/usr/bin/env bash
# The whole GPU acceptance of kdfast in one command, within 8 minutes of wall time:
#   1. the Triton tests on CUDA tensors (TRITON_INTERPRET unset): fused linear and top-k on the device with a
#      process group of one rank (tests/test_gpu_session.py's on_device tests), the kernels never run on a GPU
#      before (fused LTKD, Grouped KD, Label Revision, the top-k bucket), DIST/DKD/correlation, errors and
#      edge cases, the backend matrix, then the rest (determinism, compile, properties, top-k); capped at
#      --tests-cap-s, the log saved;
#   2. benchmarks/bench_gpu.py: kdfast vs Liger-Kernel vs torch.compile vs eager PyTorch, forward+backward
#      medians with CUDA events, peak memory, the copy-bandwidth roofline, value agreement and the
#      acceptance checks (LTKD, Grouped KD, Label Revision and the top-k bucket right after the acceptance
#      cases), under what is left of the session's time;
#   3. in OUT_DIR: gpu-session.json, gpu-session.md (printed at the end), pytest.txt, session.log.
#
# Usage, from anywhere in the repository:
#   bash benchmarks/gpu_session.sh [--dry-run] [--collect-only] [--session-s S] [--tests-cap-s S] [--budget-s S]
#                                  [OUT_DIR] [-- bench_gpu.py arguments, e.g. --cases dist dkd --runs 10]
# OUT_DIR: default $OUT when set (the device machine's folder that comes back), else
# benchmarks/results/gpu-session-<date>-<time>.
#   --session-s S    the whole script's wall-time limit (default 450: 7.5 minutes)
#   --tests-cap-s S  the tests' share of it (default 150; dry run 60; 0 skips the tests)
#   --budget-s S     the benchmark's budget (default: what is left after the tests, less a 45 s grace
#                    for the case in flight and the report; the benchmark is killed at budget + grace)
#   --collect-only   only list the tests the run would select (pytest --collect-only; the GPU selection
#                    unless --dry-run), nothing written: a bad -k expression shows on a CPU machine
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

dry_run=0 collect_only=0 session_s=450 tests_cap_s="" budget_s="" out="" bench_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; bench_args=("$@"); break ;;
        --dry-run) dry_run=1 ;;
        --collect-only) collect_only=1 ;;
        --session-s) session_s=$2; shift ;;
        --tests-cap-s) tests_cap_s=$2; shift ;;
        --budget-s) budget_s=$2; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_session.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
grace=45

export PYTHONUNBUFFERED=1 KDFAST_DISABLE_EXTENSION=1
site="${KDFAST_SITE:-/tmp/site}"
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
new_kernels=(tests/test_ltkd_fused.py tests/test_grouped_kd.py tests/test_label_revision.py tests/test_topk_triton.py
             tests/test_topk_teacher_triton.py)
if [ "$dry_run" = 1 ]; then
    export TRITON_INTERPRET=1
    tests_cap_s="${tests_cap_s:-60}"
    # one case per divergence of the backend matrix, DIST, DKD, top-k, LTKD, Grouped KD, Label Revision, the
    # top-k bucket, the top-k teacher rows' kernel (its rows and its checks), and the on-device tests
    subset="on_device or test_topk and k_equal_to_V and kl-renormalize or triton and float32 and ("
    subset+="test_kernel_matches_reference and batchmean and soft and None"
    subset+=" or test_dist_kernel_matches_reference and 33-300 or test_dkd_kernel_matches_reference and 8-10"
    subset+=" or test_matches_the_reference and teacher-batch or test_triton_float32_and_bfloat16"
    subset+=" or test_float32_and_bfloat16_against_the_float64_reference and [kl-"
    subset+=" or test_float32_and_16_bit_students and 3-student_dtype0)"
    subset+=" or test_rows_are_the_pytorch_functions and 5-dtype2 or test_bad_rows_raise_the_pytorch_forms_errors"
    tests=(-k "$subset" tests/test_gpu_session.py "${new_kernels[@]}" tests/test_backend_matrix.py
           tests/test_correlation_losses.py tests/test_topk.py)
else
    unset TRITON_INTERPRET
    tests_cap_s="${tests_cap_s:-150}"
    # The device's own tests first, then the kernels no GPU has run yet, the long matrix next, the CPU-only
    # top-k file last (all under the cap).  On a GPU every new shape, dtype and policy compiles, and an
    # autotuned kernel times each of its configs: the last session ran 197 tests (about 120 compiled
    # variants) in 222 s.  Of the new kernels' sweeps over those, a few points run here (CI's interpreter
    # runs all of them): about 140 tests and 100 variants, most of the default cap.  The sm_90 spill checks
    # need no GPU.
    sweeps="without_spills or test_matches_the_reference and float64 or test_random_group_maps"  # LTKD
    sweeps+=" or test_triton_is_the_reference_in_float64 and not -37]"  # Grouped KD: V = 37 only
    sweeps+=" or (test_the_kernels_are_the_reference_in_float64 or test_float32_and_bfloat16_against_the_float64"
    sweeps+="_reference) and not ([kl- or [jsd-)"  # Label Revision: KL and JSD
    sweeps+=" or test_every_divergence_is_the_pytorch_form_in_float64 and not [kl-"  # the top-k bucket
    sweeps+=" or test_divergence_parameters_and_temperatures and not (student_temperature or soft_weight)"
    sweeps+=" or test_float64_log_probs"
    tests=(-k "(triton or on_device or test_topk) and not ($sweeps)"
           tests/test_gpu_session.py "${new_kernels[@]}" tests/test_correlation_losses.py tests/test_errors.py
           tests/test_edge_cases.py tests/test_backend_matrix.py tests/test_determinism.py tests/test_compile.py
           tests/test_properties.py tests/test_topk.py)
fi
if [ "$collect_only" = 1 ]; then
    python3 -m pytest --collect-only -q -p no:cacheprovider "${tests[@]}"
    exit
fi

out="${out:-${OUT:-benchmarks/results/gpu-session-$(date +%F-%H%M%S)}}"
mkdir -p "$out"
log="$out/session.log"
: > "$log"

say() { echo "# $*" | tee -a "$log"; }
left() { echo $((session_s - (SECONDS - start))); }
at_most() { local a=$1 b=$2; a=$(( a < b ? a : b )); echo $(( a > 1 ? a : 1 )); }  # min(a, b), at least 1 s

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
