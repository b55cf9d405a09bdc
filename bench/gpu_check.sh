#!/usr/bin/env bash
# Every GPU check in one command that ends within a time limit, for a GPU lent for a few minutes: first the tests that
# hold on a GPU (loss falls, a killed compiled run resumes bit-identical with --deterministic 1, bf16 <-> fp16, the
# compiled decode step with CUDA graphs samples what eager does), then the benchmark at the 138m preset (the issue's
# figures: MFU, ours / HF, decoding), then a profile of the compiled step, then the trainer with each lever of
# `benchmark.py --levers`, in the time left. Everything lands in OUT_DIR: machine.txt, tests.log, bench.log, the
# benchmark's JSON, profile-138m-compile1.txt, levers.log and its JSON.
#
#   bash bench/gpu_check.sh OUT_DIR [SECONDS]      # default 570: within a 10-minute slot, with time to copy back
#
# The tests come first with a cap of their own (TEST_SECONDS, default 120; stopped by SIGINT at the cap, so that
# pytest still prints what passed): a benchmark run first would leave them nothing when its compiles run long. The
# benchmark may then take all but the last 45 s, and it stops starting variants 2 minutes before that (one started
# just then may compile for a minute or two more; the JSON keeps every variant finished); the profile, then the
# levers (from 90 s left), get what is left. A Python without torch and the other packages, or whose torch cannot
# use the GPU that is here, is an error at once (exit 2), as is a machine without a GPU unless BENCH_ARGS is set (the
# script's own test runs it on a CPU).
# BENCH_ARGS replaces "--size 138m" (e.g. "--size 350m --only trainer"), PROFILE_ARGS adds to the profile's flags,
# LEVER_ARGS replaces the levers' "--size 138m" (with BENCH_ARGS set, the levers run only if it is set), PYTHON
# names the interpreter (default python3). Exit status: the benchmark's (1 when a variant failed), else the tests'
# (the levers' runs are reported in levers.log only).
set -uo pipefail
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [SECONDS]}
limit=${2:-570}
mkdir -p "$out"
start=$SECONDS
# A broken environment must fail in seconds, not spend the slot: a CPU build of torch on a GPU machine would run the
# whole benchmark on the CPU without a word
if ! "$py" -c "import numpy, pytest, sentencepiece, torch, tqdm, transformers" 2>/dev/null; then
  echo "error: $py lacks torch or another package of requirements.txt (or pytest): install them, or set PYTHON" \
    | tee "$out/machine.txt"
  exit 2
fi
if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  if nvidia-smi -L >/dev/null 2>&1; then
    echo "error: a GPU is here, but the torch of $py cannot use it (a CPU build?): install the CUDA build" \
      | tee "$out/machine.txt"
    exit 2
  elif [ -z "${BENCH_ARGS:-}" ]; then
    echo "error: no GPU that torch can use here, and this script benchmarks the 138m preset on one. HINT: on a CPU" \
      "run \`python bench/benchmark.py\` (the quick size); set BENCH_ARGS (e.g. \"--size tiny\") to try this script" \
      | tee "$out/machine.txt"
    exit 2
  fi
fi
command -v cc >/dev/null || echo "warning: no C compiler (cc): every torch.compile variant will fail"
{
  date -u
  nvidia-smi || echo "no nvidia-smi"
  "$py" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| transformers', transformers.__version__, '| gpu',
torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} >"$out/machine.txt" 2>&1
tail -n 1 "$out/machine.txt"

tests=0
test_limit=$((limit > 300 ? ${TEST_SECONDS:-120} : limit / 4))
CUBLAS_WORKSPACE_CONFIG=:4096:8 LM_TEST_DEVICE=cuda PYTHONUNBUFFERED=1 \
  timeout --signal=INT --kill-after=10 "$test_limit" "$py" -m pytest -q -p no:cacheprovider \
  tests/test_train.py tests/test_generate.py \
  -k "loss_falls or deterministic_run or switches_between or compiled_decode_step_matches_eager" 2>&1 \
  | tee "$out/tests.log"
tests=$?

left=$((limit - (SECONDS - start)))
bench_limit=$((left > 240 ? left - 45 : left / 2))
bench_budget=$((bench_limit > 180 ? bench_limit - 120 : bench_limit / 2))
# shellcheck disable=SC2086  # BENCH_ARGS and PROFILE_ARGS are lists of flags
PYTHONUNBUFFERED=1 timeout --signal=TERM --kill-after=20 "$bench_limit" \
  "$py" bench/benchmark.py ${BENCH_ARGS:---size 138m} --time_budget "$bench_budget" --out "$out" 2>&1 \
  | tee "$out/bench.log"
bench=$?
[ "$bench" -eq 124 ] && echo "the benchmark was stopped at its time limit ($bench_limit s); its JSON holds every \
variant it finished"

# Where the compiled step's time goes, from the benchmark's warm compile cache: a table for the next lever
left=$((limit - (SECONDS - start) - 5))
if [ "$left" -ge 30 ]; then
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout --kill-after=5 "$left" "$py" bench/profile_step.py ${PROFILE_ARGS:-} --out "$out" 2>&1 \
    | tail -n 25
fi

# The levers for the compiled step's elementwise work (bench/README, Results), in the time left: the trainer at 138m
# as it runs, then once with each lever, a row each (levers.log, and a JSON named ...-levers-...). Not with BENCH_ARGS
# set alone: another benchmark was asked for (or this is a CPU, where 138m would take the time left for nothing)
left=$((limit - (SECONDS - start) - 5))
if [ "$left" -ge 90 ] && { [ -z "${BENCH_ARGS:-}" ] || [ -n "${LEVER_ARGS:-}" ]; }; then
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout --signal=TERM --kill-after=10 "$left" "$py" bench/benchmark.py ${LEVER_ARGS:---size 138m} \
    --only trainer --levers --time_budget $((left - 20)) --out "$out" 2>&1 | tee "$out/levers.log" | tail -n 12
fi
echo "benchmark exit $bench, tests exit $tests, $((SECONDS - start)) s"
[ "$bench" -ne 0 ] && exit "$bench"
exit "$tests"
