#!/usr/bin/env bash
# The costlier GPU checks, for when a lease has time left after gpu_check.sh (same rules: stages
# under time limits, a RESULT line each, logs.tgz, at most 8 files, no image written).
#
#   FASTNST_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check_more.sh DIR
#   bash benchmarks/gpu_check_more.sh --dry-run DIR    # the same stages on the CPU, tiny
#
#   stage          limit  what
#   0 env           20 s  as in gpu_check.sh
#   1 kernel-bench  70 s  Triton Gram and style loss against the PyTorch twins and their floors
#                         (measured matmul and copy peaks), bf16 and fp32, 512/1024/2048 px
#   2 max-size     100 s  the largest square image that fits, fast path and reference (bisection
#                         with real two-step runs; CUDA only)
#   3 large         90 s  2048 px fp16 L-BFGS (loss scaling, skipped steps); 8192 px Adam, --tile auto
#   4 batch         60 s  16 jobs at 512 px: batches of 8 against a loop of single renders
#   5 launches      40 s  CUDA kernels per eager step, batch of 1 against batch of 8 at 256 px
#   6 video         60 s  fastnst video frames/s, sequential and multipass, 8 frames at 512 and
#                         1024 px, 50 iterations, a known flow (no OpenCV/PyAV on the image)
#
# Limits add up to 440 s (510 s with the grace after SIGINT).  DIR receives summary.txt,
# kernel-bench.json, maxsize.json, large.json, batch.json, launches.json, video.json and logs.tgz.
set -uo pipefail
. "$(dirname "$0")/stages.sh"
stages_begin "$@"

stage 0 env 20 "$PY" benchmarks/check_env.py $dry_flag
if [ "$dry_run" = 1 ]; then  # the CUDA-only stages check their command lines and exit cleanly
    stage 1 kernel-bench 70 "$PY" benchmarks/bench_kernels.py --sizes 64 --json "$out/kernel-bench.json"
    stage 2 max-size 100 "$PY" -m fastnst bench --device cpu --sizes 32 --optimizers lbfgs --modes fast \
        --iterations 1 --repeats 1 --warmup 0 --json "$out/maxsize.json"
    stage 3 large 90 "$PY" benchmarks/check_large.py --dry-run --json "$out/large.json"
    stage 4 batch 60 "$PY" benchmarks/bench_batch.py --device cpu --size 32 --jobs 2 --batch-size 2 \
        --iterations 2 --json "$out/batch.json"
    stage 5 launches 40 "$PY" benchmarks/count_launches.py --device cpu --size 32 --batches 1 2 \
        --optimizers lbfgs --json "$out/launches.json"
    stage 6 video 60 "$PY" benchmarks/bench_video.py --dry-run --json "$out/video.json"
else
    stage 1 kernel-bench 70 "$PY" benchmarks/bench_kernels.py --sizes 512 1024 2048 --dtypes bf16 fp32 \
        --json "$out/kernel-bench.json"
    stage 2 max-size 100 "$PY" -m fastnst bench --max-size --json "$out/maxsize.json"
    stage 3 large 90 "$PY" benchmarks/check_large.py --json "$out/large.json"
    stage 4 batch 60 "$PY" benchmarks/bench_batch.py --device cuda --size 512 --jobs 16 --batch-size 8 \
        --iterations 20 --json "$out/batch.json"
    stage 5 launches 40 "$PY" benchmarks/count_launches.py --device cuda --size 256 --batches 1 8 \
        --json "$out/launches.json"
    stage 6 video 60 "$PY" benchmarks/bench_video.py --sizes 512 1024 --frames 8 --iterations 50 \
        --json "$out/video.json"
fi

stages_end
