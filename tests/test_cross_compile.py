"""Every Triton kernel a run launches compiles for sm_90 (H100/H200), on this CPU, within the GPU's limits.

``benchmarks/cross_compile.py`` drives fastnst's own launchers with the CUDA driver replaced by one
that only names the target, so Triton's real compiler (not the interpreter the kernel tests use)
builds every specialization a run would make, and ptxas's register, spill and shared-memory use
is read back from the binaries.  It runs in a subprocess: the interpreter, which the rest of the
suite uses, is chosen when Triton is imported.  Each dtype is its own test so pytest-xdist spreads
the compiles (about a minute of one core per dtype) over the workers.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "cross_compile.py"
KERNELS = {"_gram_kernel", "_gram_backward_kernel", "_grouped_gram_kernel", "_grouped_gram_backward_kernel",
           "_content_forward_kernel", "_content_backward_kernel"}
HANG_GUARD_S = 1200  # generous: it guards a hang, the verdict is the compile's


def cross_compile(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a fresh cache: nothing is skipped
    report = tmp_path / "compiled.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(report)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert report.exists(), done.stdout[-2000:] + done.stderr[-4000:]
    return done, json.loads(report.read_text())


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_every_kernel_compiles_for_sm90_within_its_limits(tmp_path, dtype):
    # fp32 (no spill rule; its products are plain FMAs) at one size, to keep the suite short:
    # `cross_compile.py --matrix ci` compiles it at both, as docs/compiled-kernels.md shows.
    sizes = ["--size", "512"] if dtype == "fp32" else []
    done, report = cross_compile(tmp_path, "--matrix", "ci", "--dtype", dtype, *sizes)
    assert done.returncode == 0 and not report["failures"], "\n".join(report["failures"]) + done.stderr[-2000:]
    kernels = report["kernels"]
    assert {k["kernel"] for k in kernels} == KERNELS
    assert all(k["dtypes"] == [dtype] and k["registers"] > 0 and k["cases"] for k in kernels)
    if dtype != "fp32":  # the default (bf16) and --precision fp16 paths: no spill anywhere
        assert [k["kernel"] for k in kernels if k["stack_bytes"]] == []
    # The forward Gram kernels run 8 warps; at 16 bits capped at 128 registers (they were 206-255
    # at 4 warps), so two blocks of 256 threads share an SM, without a spill (asserted above).
    forward = [k for k in kernels if k["kernel"] in ("_gram_kernel", "_grouped_gram_kernel")]
    assert {k["warps"] for k in forward} == {8}
    if dtype != "fp32":
        assert max(k["registers"] for k in forward) <= 128


def test_the_grouped_kernels_compile_once_for_every_image_size(tmp_path):
    """Five image sizes whose layers all have positions divisible by 16 give the grouped kernels
    different program offsets and splits; none of them is part of the compiled key, so each grouped
    kernel compiles once (three forward variants when the offsets were arguments)."""
    done, report = cross_compile(tmp_path, "--path", "grouped", "--dtype", "bf16", "--layout", "channels_last",
                                 "--mode", "split", *[f"--size={side}" for side in (256, 512, 768, 1024, 2048)])
    assert done.returncode == 0, report["failures"]
    assert report["cases"] == 5
    variants = collections.Counter(k["kernel"] for k in report["kernels"])
    assert variants == {"_grouped_gram_kernel": 1, "_grouped_gram_backward_kernel": 1}


def test_the_limits_refuse_what_sm90_cannot_launch():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from cross_compile import MAX_SHARED_BYTES, Compiled
    finally:
        sys.path.remove(str(SCRIPT.parent))

    def compiled(registers=100, stack=0, shared=1024, warps=4, dtypes=("bf16",)):
        return Compiled("_k", registers, stack, shared, warps, ["case"], set(dtypes))

    assert compiled().problems() == []
    assert compiled(registers=255, warps=4).problems() == []  # 255 x 128 threads fits in 65,536
    assert "registers" in compiled(registers=129, warps=16).problems()[0]  # 129 x 512 does not
    assert "shared memory" in compiled(shared=MAX_SHARED_BYTES + 1).problems()[0]
    assert "spills" in compiled(stack=8, dtypes=("fp16",)).problems()[0]
    assert compiled(stack=8, dtypes=("fp32",)).problems() == []  # reported in the table, not refused
