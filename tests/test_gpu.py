"""CUDA runs agree with CPU runs (marked gpu: skipped on machines without CUDA)."""

from __future__ import annotations

import pytest
import torch

from fastnst import render

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_cuda_run_matches_cpu_run(optimizer, content_path, style_path, small_config):
    # TF32 convolutions (PyTorch's default for cuDNN) change results at the 1e-3 level; turn them
    # off so that fp32 on the GPU is compared with fp32 on the CPU.
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        config = small_config.replace(iterations=5, optimizer=optimizer)
        cpu = render(content_path, style_path, config, device="cpu")
        gpu = render(content_path, style_path, config, device="cuda", report_every=1)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    cpu_losses = torch.tensor([loss for _, loss in cpu.losses])
    gpu_losses = torch.tensor([loss for _, loss in gpu.losses])
    torch.testing.assert_close(gpu_losses, cpu_losses, rtol=1e-3, atol=0)
    torch.testing.assert_close(gpu.image, cpu.image, rtol=0, atol=1e-2)
