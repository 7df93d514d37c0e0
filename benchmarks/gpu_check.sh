#!/usr/bin/env bash
# One-shot GPU validation: the GPU-marked tests and the kernel tests compiled on CUDA, then the
# kernel benchmark and the step benchmark (s/iter at 512/1024/2048 px for fp32-eager, bf16-eager
# and bf16-graph, with a profiler summary).  Writes everything to DIR (default
# benchmarks/results/) and prints a short table last.  Runs from the source tree (PYTHONPATH=.),
# installs nothing.
#
#   bash benchmarks/gpu_check.sh [DIR]        (FASTNST_COMMIT=<sha> records the commit measured)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
stamp=$(date -u +%Y%m%dT%H%M%SZ)
status=0

python -m fastnst info > "$out/info-$stamp.txt" 2>&1 || status=1
echo "== tests on the GPU (gpu-marked + kernels compiled for CUDA)"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py tests/test_precision.py \
    --junitxml="$out/gpu-tests-$stamp.xml" > "$out/gpu-tests-$stamp.log" 2>&1 || status=1
tail -n 5 "$out/gpu-tests-$stamp.log"

echo "== kernel benchmark"
python benchmarks/bench_kernels.py --json "$out/kernels-$stamp.json" > "$out/kernels-$stamp.txt" 2>&1 || status=1

echo "== step benchmark"
python benchmarks/bench_step.py --profile --json "$out/step-$stamp.json" > "$out/step-$stamp.txt" 2>&1 || status=1

echo "== summary ($stamp)"
head -n 3 "$out/info-$stamp.txt"
# The short table: 1024 px, bf16, channels_last rows, plus the peaks and the launch overhead.
grep -E "^measured|^launch|^ size|^ 1024 .* bf16 +channels_last" "$out/kernels-$stamp.txt" || tail -n 20 "$out/kernels-$stamp.txt"
head -n 10 "$out/step-$stamp.txt"
exit $status
