"""pytest-benchmark suite: one step of fastnst's fast path vs the textbook reference.

    pytest benchmarks --benchmark-only -n 0    # in one process: pytest-benchmark does not time under xdist

Small sizes on the CPU (64 and 128 px), real sizes on a GPU (512 and 1024 px).  Each round runs a
few steps and, on a GPU, synchronises, so the clock sees the GPU work.
"""

from __future__ import annotations

import pytest
import torch

from fastnst import StyleConfig
from fastnst import reference_gatys as textbook
from fastnst.run import build_run, resolve_runtime, synthetic_inputs
from fastnst.vgg import random_state_dict

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = (512, 1024) if DEVICE.type == "cuda" else (64, 128)
STEPS_PER_ROUND = 3


def _synchronised(step):
    def run():
        for _ in range(STEPS_PER_ROUND):
            step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


def _fastnst_step(size: int):
    config = StyleConfig(size=size, weights="random", quiet=True)
    run = build_run(resolve_runtime(config, DEVICE), config, synthetic_inputs(size, DEVICE))
    return lambda: run.step(run.image)


def _reference_step(size: int):
    config = StyleConfig()
    content, style = (torch.rand(1, 3, size, size, device=DEVICE) for _ in range(2))
    model, style_losses, content_losses = textbook.build_model(
        random_state_dict(0), content, style, config.content_layers, config.style_layers)
    image = torch.rand(1, 3, size, size, device=DEVICE).requires_grad_(True)
    return textbook.make_step(model, style_losses, content_losses, image, textbook.make_optimizer("lbfgs", image))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("implementation", ["fastnst", "reference"])
def test_step(benchmark, implementation, size):
    step = (_fastnst_step if implementation == "fastnst" else _reference_step)(size)
    benchmark.extra_info.update(device=str(DEVICE), size=size, steps_per_round=STEPS_PER_ROUND)
    benchmark.pedantic(_synchronised(step), rounds=5, warmup_rounds=1)
