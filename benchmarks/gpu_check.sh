#!/usr/bin/env bash
# One-shot GPU validation, most valuable first, each stage under a time limit so the whole script
# ends within about 13 minutes of device time (timeouts add up to 760 s; expect far less):
#   1. the GPU-marked tests and the kernel tests compiled for CUDA      (<= 150 s)
#   2. fastnst bench: 512/1024/2048 px, L-BFGS and Adam, ablations, reference, plot (<= 150 s),
#      then the largest image that fits, fast path and reference        (<=  90 s)
#   3. the kernel benchmark (Triton vs the PyTorch twins, with floors)  (<=  80 s)
#   4. fp32-eager step timing and a profiler summary of the bf16 step   (<=  50 s)
#   5. an 8192 px image, tiled automatically, 10 Adam iterations        (<= 120 s)
#   6. batch mode vs a loop of single renders at 512 px                 (<= 120 s)
# Writes everything to DIR (default benchmarks/results/) and prints a short summary last.
# Runs from the source tree (PYTHONPATH=.), installs nothing.
#
#   FASTNST_COMMIT=<sha> bash benchmarks/gpu_check.sh [DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
stamp=$(date -u +%Y%m%dT%H%M%SZ)
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'no-gpu')")
status=0

python -m fastnst info > "$out/info-$gpu-$stamp.txt" 2>&1 || status=1

echo "== 1. tests on the GPU"
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
    --junitxml="$out/gpu-tests-$gpu-$stamp.xml" > "$out/gpu-tests-$gpu-$stamp.log" 2>&1 || status=1
tail -n 4 "$out/gpu-tests-$gpu-$stamp.log"

echo "== 2. fastnst bench, then the largest image per mode"
timeout 150 python -m fastnst bench --sizes 512 1024 2048 --ablate --iterations 10 --repeats 3 \
    --json "$out/bench-$gpu-$stamp.json" --plot "$out/bench-$gpu-$stamp.png" \
    > "$out/bench-$gpu-$stamp.txt" 2>&1 || status=1
timeout 90 python -m fastnst bench --max-size --json "$out/maxsize-$gpu-$stamp.json" \
    >> "$out/bench-$gpu-$stamp.txt" 2>&1 || status=1

echo "== 3. kernel benchmark"
timeout 80 python benchmarks/bench_kernels.py --sizes 512 1024 2048 --json "$out/kernels-$gpu-$stamp.json" \
    > "$out/kernels-$gpu-$stamp.txt" 2>&1 || status=1

echo "== 4. fp32-eager step and profile"
timeout 50 python benchmarks/bench_step.py --modes fp32-eager --profile --json "$out/step-$gpu-$stamp.json" \
    > "$out/step-$gpu-$stamp.txt" 2>&1 || status=1

echo "== 5. a large image: 8192 px, Adam, --tile auto, 10 iterations, timed"
timeout 120 python -m fastnst stylize examples/tubingen.jpg examples/starry_night.jpg -o "$out/large-$gpu-$stamp.jpg" \
    --weights random --size 8192 --iterations 10 --optimizer adam --tile auto --verbose \
    > "$out/large-$gpu-$stamp.txt" 2>&1 || status=1

echo "== 6. batch mode against a loop of single renders, 512 px"
timeout 120 python benchmarks/bench_batch.py --size 512 --jobs 16 --batch-size 8 --iterations 20 \
    --json "$out/batch-$gpu-$stamp.json" > "$out/batch-$gpu-$stamp.txt" 2>&1 || status=1

echo "== summary ($gpu, $stamp, exit $status)"
head -n 4 "$out/info-$gpu-$stamp.txt"
grep -E "^headline|^ size| fast | reference |^largest" "$out/bench-$gpu-$stamp.txt" | head -n 30
grep -E "^measured|^launch|^ 1024 .* bf16 +channels_last" "$out/kernels-$gpu-$stamp.txt" | head -n 16
head -n 5 "$out/step-$gpu-$stamp.txt"
grep "fastnst:" "$out/large-$gpu-$stamp.txt" | tail -n 4
tail -n 2 "$out/batch-$gpu-$stamp.txt"
exit $status
