"""The kernel benchmark's cost model and its behaviour without a GPU (the timing needs CUDA)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_model_matches_the_published_one(bench):
    """baselines.md: full Grams of conv1_1..conv5_1 cost 34,816 FLOPs per input pixel; the
    symmetric kernel does half of that, and the style backward (G - A) F another 34,816."""
    size = 512
    pixels = size * size
    gram_flops = sum(bench.gram_cost(c, m, 2)[0] for _, c, m in bench.layer_shapes(size))
    style_flops = sum(bench.style_cost(c, m, 2)[0] for _, c, m in bench.layer_shapes(size))
    assert gram_flops == 34_816 / 2 * pixels
    assert style_flops == (34_816 / 2 + 34_816) * pixels
    assert [m for _, _, m in bench.layer_shapes(1024)] == [1024**2, 512**2, 256**2, 128**2, 64**2]
    # Bytes: a bf16 Gram of conv1_1 at 512 px reads 64 x 262144 x 2 bytes and writes 64 x 64 fp32.
    assert bench.gram_cost(64, 262_144, 2)[1] == 64 * 262_144 * 2 + 64 * 64 * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the benchmark runs instead of skipping")
def test_skips_cleanly_without_cuda(bench, capsys):
    assert bench.main(["--sizes", "512"]) == 0
    assert "no CUDA device: kernel benchmark skipped" in capsys.readouterr().out
