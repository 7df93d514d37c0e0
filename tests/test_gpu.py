"""CUDA-only checks (marked gpu; skipped without CUDA, run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fastnst import StyleConfig, render
from fastnst.engine import prepare
from fastnst.objective import feature_layers
from fastnst.vgg import VGGFeatures, random_state_dict

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def no_tf32():
    """TF32 convolutions (PyTorch's cuDNN default) change fp32 results at the 1e-3 level."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_cuda_fp32_run_matches_cpu_run(optimizer, content_path, style_path, small_config):
    config = small_config.replace(iterations=5, optimizer=optimizer, precision="fp32")
    with no_tf32():
        cpu = render(content_path, style_path, config, device="cpu")
        gpu = render(content_path, style_path, config, device="cuda", report_every=1)
    assert gpu.backend == "triton" and gpu.cuda_graph
    cpu_losses = torch.tensor([loss for _, loss in cpu.losses])
    gpu_losses = torch.tensor([loss for _, loss in gpu.losses])
    torch.testing.assert_close(gpu_losses, cpu_losses, rtol=1e-3, atol=0)
    torch.testing.assert_close(gpu.image, cpu.image, rtol=0, atol=1e-2)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("bf16", 2e-2)])
def test_graph_replay_matches_eager_after_50_iterations(precision, tolerance, content_path, style_path,
                                                        small_config):
    """Adam, whose trajectory is smooth: the split Gram's atomics make runs differ in the last
    bits, which L-BFGS would amplify.  Tolerances are max |pixel difference| in [0, 1] units."""
    config = small_config.replace(size=128, iterations=50, optimizer="adam", precision=precision,
                                  device="cuda", report_every=1)
    with no_tf32():
        eager = render(content_path, style_path, config, cuda_graph=False)
        graphed = render(content_path, style_path, config, cuda_graph=True)
    assert graphed.cuda_graph and not eager.cuda_graph
    assert (graphed.image - eager.image).abs().max().item() <= tolerance
    assert graphed.loss == pytest.approx(eager.loss, rel=10 * tolerance)


@pytest.mark.parametrize("graphed", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_no_host_sync_inside_the_loop(graphed, precision):
    config = StyleConfig(size=64)
    content, style = (torch.rand(1, 3, 48, 64, device="cuda") for _ in range(2))
    network = VGGFeatures(feature_layers(config), random_state_dict(0)).cuda()
    run = prepare(network, content, [style], config, precision, graphed)
    if not graphed:
        run.step(run.image)  # first call compiles the Triton kernels (may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            loss = run.step(run.image)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_fp16_with_loss_scaling_never_goes_nan_at_512px(content_path, style_path):
    result = render(content_path, style_path, weights="random", size=512, iterations=200, precision="fp16",
                    device="cuda", report_every=1, quiet=True)
    losses = torch.tensor([loss for _, loss in result.losses])
    assert len(losses) == 200 and torch.isfinite(losses).all()
    assert result.loss < result.losses[0][1]


def test_auto_precision_is_bf16_with_a_graph(content_path, style_path, small_config):
    result = render(content_path, style_path, small_config.replace(device="cuda", iterations=3))
    assert result.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert result.cuda_graph and result.peak_memory_bytes > 0
