#!/usr/bin/env bash
# First contact with a GPU machine: the most decisive evidence first, each stage under its own
# time limit, and results that come back even when a stage fails or the call is cut short.
#
#   FASTNST_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh DIR
#   bash benchmarks/gpu_check.sh --dry-run DIR    # the same stages on the CPU, tiny (checks the script)
#
#   stage       limit  what
#   0 env        20 s  device, SMs, driver, CUDA/cuDNN/torch/Triton versions; one Triton Gram vs float64
#   1 kernels   100 s  the compiled kernels at the five style layers and conv4_2 of 512/1024/2048 px,
#                      bf16/fp32/fp16, channels_last and contiguous, vs float64, NaN-poisoned outputs;
#                      the grouped style-loss kernels over the five layers; the split reduction 50
#                      times at 512 splits (about 50 Triton compiles, ~1-2 s each, made first by
#                      cross_compile.py in six processes side by side)
#   2 graph      50 s  CUDA-graph replay vs eager at 512 and 1024 px: one step, 20-step trajectories;
#                      no host sync inside replays
#   3 tests      90 s  the GPU-marked, kernel and launch-grid tests (pytest-xdist, per-test limit)
#   4 timing     70 s  s/iter with L-BFGS at 512/1024/2048 px: fast path, plain (fp32, eager, PyTorch
#                      kernels) and the textbook reference, each row saved as it is measured; then
#                      the fast path with Adam, for the L-BFGS share of a step
#   5 profile    30 s  the 15 CUDA kernels with the most time over three bf16 steps at 1024 px
#
# Limits add up to 360 s, 420 s at most with each stage's 10 s of grace after SIGINT: a 450 s call
# leaves room to run it twice in one 15-minute lease.  DIR receives six files: summary.txt (a RESULT
# line per stage, appended as it ends), kernels.json, graph.json, timing.json (a `fastnst bench`
# result, with the L-BFGS share), profile.json, and logs.tgz (every stage's full log and the tests' JUnit report).
# The costlier checks (max size, 8192 px tiled, batch, fp16 at 2048 px) are in gpu_check_more.sh.
set -uo pipefail
. "$(dirname "$0")/stages.sh"
stages_begin "$@"

stage 0 env 20 "$PY" benchmarks/check_env.py $dry_flag
stage 1 kernels 100 "$PY" benchmarks/check_kernels.py $dry_flag --json "$out/kernels.json"
stage 2 graph 50 "$PY" benchmarks/check_graph.py $dry_flag --json "$out/graph.json"
stage 3 tests 90 "$PY" benchmarks/run_tests.py $dry_flag --junit "$work/logs/tests.xml"
stage 4 timing 70 "$PY" benchmarks/check_timing.py $dry_flag --json "$out/timing.json"
stage 5 profile 30 "$PY" benchmarks/profile_step.py $dry_flag --json "$out/profile.json"

stages_end
