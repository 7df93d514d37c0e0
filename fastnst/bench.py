"""Timing of one optimisation step, and the cost model the timings are reported against.

``time_step`` builds the same network, objective, optimiser and step as a real run (random
weights and random images: speed does not depend on them), warms up, then times iterations with
the right clock: CUDA events on a GPU, a wall clock on the CPU.

Cost model (``../shared/reference/baselines.md``, VGG19 through conv5_1, per input pixel):
convolutions 722,304 FLOPs forward and about as much backward to the input; Gram matrices of
conv1_1..conv5_1 34,816 (full, as the textbook computes them); the style gradient (G - A) F
34,816.  "Model TFLOP/s" is that count over the measured time, whatever shortcut (symmetric Grams)
the implementation takes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .config import StyleConfig
from .engine import prepare
from .objective import feature_layers
from .precision import resolve_precision
from .vgg import VGGFeatures, random_state_dict

CONV_FLOPS_PER_PIXEL = 722_304  # forward; backward to the input costs about the same
GRAM_FLOPS_PER_PIXEL = 34_816  # all five style Grams, full matrices
STYLE_GRAD_FLOPS_PER_PIXEL = 34_816  # (G - A) F for the five style layers


def model_flops(height: int, width: int) -> float:
    """FLOPs of one iteration by the cost model: conv forward + backward, Grams, style gradient."""
    per_pixel = 2 * CONV_FLOPS_PER_PIXEL + GRAM_FLOPS_PER_PIXEL + STYLE_GRAD_FLOPS_PER_PIXEL
    return float(per_pixel * height * width)


@dataclass
class StepTiming:
    size: int
    precision: str
    cuda_graph: bool
    optimizer: str
    backend: str
    seconds_per_iteration: float  # median over repeats
    spread: tuple[float, float]  # (min, max) over repeats
    model_tflops: float
    peak_memory_bytes: int | None


def time_step(size: int, *, precision: str = "auto", cuda_graph: bool = True, optimizer: str = "lbfgs",
              backend: str | None = None, device: str = "cuda", iterations: int = 20, repeats: int = 5,
              warmup: int = 3, history: int | None = None) -> StepTiming:
    """Seconds per iteration of the real step on a size x size image.

    ``warmup`` eager iterations precede the timing; a graphed step warms up itself before capture.
    """
    config = StyleConfig(size=size, optimizer=optimizer, backend=backend, precision=precision,
                         cuda_graph=cuda_graph, lbfgs_history=history or StyleConfig().lbfgs_history)
    dev = torch.device(device)
    precision = resolve_precision(precision, dev)
    graphed = dev.type == "cuda" and cuda_graph
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    g = torch.Generator().manual_seed(0)
    content, style = (torch.rand(1, 3, size, size, generator=g).to(dev) for _ in range(2))
    network = VGGFeatures(feature_layers(config), random_state_dict(0), pooling=config.pooling).to(dev)
    run = prepare(network, content, [style], config, precision, graphed)
    step, image = run.step, run.image
    if not graphed:
        for _ in range(warmup):  # GraphedStep warms up itself
            step(image)
    times = [_timed(step, image, iterations, dev) / iterations for _ in range(repeats)]
    seconds = statistics.median(times)
    return StepTiming(size=size, precision=precision, cuda_graph=graphed, optimizer=optimizer,
                      backend=run.objective.ops.name, seconds_per_iteration=seconds,
                      spread=(min(times), max(times)), model_tflops=model_flops(size, size) / seconds / 1e12,
                      peak_memory_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)


def _timed(step, image: torch.Tensor, iterations: int, device: torch.device) -> float:
    """Seconds for ``iterations`` steps: CUDA events around the GPU work, or a wall clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iterations):
            step(image)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    for _ in range(iterations):
        step(image)
    return time.perf_counter() - begin
