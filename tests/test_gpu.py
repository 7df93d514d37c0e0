"""CUDA-only checks (marked gpu; skipped without CUDA, run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fastnst import StyleConfig, render
from fastnst.kernels.backend import deterministic
from fastnst.run import GraphedStep, Inputs, build_run, resolve_runtime

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


def _built(config: StyleConfig, height: int, width: int):
    """The run of ``config`` on seeded random images and random weights, on the GPU."""
    g = torch.Generator().manual_seed(3)
    content, style = (torch.rand(1, 3, height, width, generator=g).cuda() for _ in range(2))
    return build_run(resolve_runtime(config, torch.device("cuda")), config, Inputs(content=content, styles=[style]))


def _prepared(precision: str, graphed: bool, size: int = 128):
    """Graph and eager runs see identical inputs."""
    config = StyleConfig(size=size, optimizer="lbfgs", weights="random", precision=precision, cuda_graph=graphed,
                         quiet=True)
    return _built(config, size, size)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_replay_follows_the_eager_lbfgs_trajectory(precision):
    """20 L-BFGS steps replayed from a CUDA graph against 20 eager steps, deterministic algorithms.

    Both runs then execute the same kernels on the same inputs in the same order, so in principle
    they agree bit for bit (the loss's cross-tile atomic sum is the one free order left, and the
    trajectory never reads the loss: L-BFGS without line search uses gradients only).  Allowed:
    1e-4 on pixels in [0, 1] and 1e-4 relative on each loss, room for a last-bit difference that
    L-BFGS amplifies over 20 steps.  A replay that skips a kernel or reads a stale buffer is off by
    far more: the step moves pixels by ~1e-2 and the loss by ~10 % over these 20 steps.
    """
    runs = {}
    with deterministic(), no_tf32():
        for graphed in (False, True):
            run = _prepared(precision, graphed)
            assert isinstance(run.step, GraphedStep) == graphed
            losses = [run.step(run.image).clone() for _ in range(20)]
            torch.cuda.synchronize()
            runs[graphed] = (torch.stack(losses).double().cpu(), run.image.detach().double().cpu())
    (eager_losses, eager_image), (graph_losses, graph_image) = runs[False], runs[True]
    assert torch.isfinite(eager_losses).all() and eager_losses[-1] < eager_losses[0]
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=0)
    assert (graph_image - eager_image).abs().max().item() <= 1e-4


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_one_graphed_step_equals_one_eager_step_with_split_grams(precision, tolerance):
    """The default kernels (Gram split over programs, partial tiles added with atomics): one
    L-BFGS step from the same image, replayed and eager.  The first L-BFGS step is
    -g / max(1, |g|_1), so the image change compares the gradients themselves.

    The atomics change the order in which each Gram tile's partial sums are added, so G differs
    by fp32 rounding (~1e-7 relative).  fp32: the gradient inherits that, far inside 1e-4.
    bf16: D = G - A is rounded to bf16 (2^-8) before the tensor-core product, so an element whose
    fp32 value sits at a rounding boundary may round the other way; over the whole gradient that
    stays well inside 1e-2.  The loss at the shared start image differs only by fp32 rounding.
    """
    results = {}
    with no_tf32():
        for graphed in (False, True):
            run = _prepared(precision, graphed)
            start = run.image.detach().clone()
            loss = run.step(run.image)
            torch.cuda.synchronize()
            results[graphed] = (loss.double().item(), (run.image.detach() - start).double())
    (eager_loss, eager_step), (graph_loss, graph_step) = results[False], results[True]
    assert eager_step.abs().max().item() > 0
    assert graph_loss == pytest.approx(eager_loss, rel=1e-5)
    difference = ((graph_step - eager_step).norm() / eager_step.norm()).item()
    assert difference <= tolerance, f"relative difference of the steps {difference:.3g}"


@pytest.mark.parametrize("graphed", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_no_host_sync_inside_the_loop(graphed, precision):
    run = _built(StyleConfig(size=64, weights="random", precision=precision, cuda_graph=graphed, quiet=True), 48, 64)
    if not graphed:
        run.step(run.image)  # first call compiles the Triton kernels (may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            loss = run.step(run.image)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).all().item()


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


@pytest.mark.parametrize("options", [
    {"style_loss": "meancov"},
    {"normalize_gradients": True},
    {"average_decay": 0.9},
    {"style_loss": "meancov", "normalize_gradients": True, "average_decay": 0.99, "optimizer": "adam"},
], ids=["meancov", "normalize", "average", "all-adam"])
def test_quality_options_run_in_a_cuda_graph_as_eagerly(options):
    """Each of the peers' quality options inside a captured step: 10 graphed steps follow 10 eager
    ones (deterministic algorithms, fp32, no TF32; tolerances as in the L-BFGS replay test above),
    and the output (the average, with --average-decay) agrees too."""
    outputs = {}
    with deterministic(), no_tf32():
        for graphed in (False, True):
            config = StyleConfig(size=64, weights="random", precision="fp32", cuda_graph=graphed, quiet=True,
                                 **options)
            run = _built(config, 64, 64)
            assert isinstance(run.step, GraphedStep) == graphed
            losses = torch.stack([run.step(run.image).clone() for _ in range(10)])
            torch.cuda.synchronize()
            outputs[graphed] = (losses.double().cpu(), run.output().double().cpu())
    (eager_losses, eager_out), (graph_losses, graph_out) = outputs[False], outputs[True]
    assert torch.isfinite(eager_losses).all() and eager_losses[-1] < eager_losses[0]
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=0)
    assert (graph_out - eager_out).abs().max().item() <= 1e-4


def test_init_image_runs_on_cuda(tmp_path, content_path, style_path, small_config):
    result = render(content_path, style_path, small_config.replace(device="cuda", init=str(style_path),
                                                                   iterations=5))
    assert result.cuda_graph and torch.isfinite(result.image).all()
