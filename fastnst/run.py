"""One optimisation run, assembled in one place, for every front end (render, batch, plan, bench).

``resolve_runtime`` settles once what runs need from the machine: device, precision, kernel
backend, whether steps may be captured in a CUDA graph, and the network.  ``build_run`` assembles a
run from it: the objective (or the tiler for large images), start image(s), optimiser, fp16 loss
scaler and the step ``step(image) -> per-sample losses``: loss, gradient and the optimiser's
in-place update, on the device with buffers of fixed shape and no host synchronisation, so that on
CUDA an untiled step is captured once in a CUDA graph (``GraphedStep``) and replayed.  A ``Run``
optimises (loop.py) and is what the planner and ``fastnst bench`` time.

The image is optimised unconstrained by L-BFGS: clamping it inside the loop would make the stored
steps s differ from the steps the gradients y saw; the result is clipped to [0, 1] when read out.
Adam projects onto [0, 1] after every update (optim.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import color
from .config import INITS, RANDOM_WEIGHTS_SEED, ObjectiveOptions, RuntimeOptions, StyleConfig
from .devices import resolve_device
from .kernels.backend import ops as kernel_ops
from .kernels.backend import resolve as resolve_backend
from .loop import Hooks, RunResult, Step, optimise
from .measure import MemoryModel, peak_bytes, reset_peak
from .objective import StyleObjective, TemporalTarget, feature_layers
from .images import image_to_tensor, load_image
from .optim import IterateAverage, make_optimizer
from .precision import LossScaler, autocast_for, resolve_precision
from .tiling import TiledFeatures, Tiler, exact_halo
from .vgg import VGGFeatures, layer_channels, layer_stride, load_network_weights

# Noise initialisation: mid-grey plus Gaussian noise of this standard deviation, so that the
# start is white noise (the paper's choice) yet stays inside the valid pixel range.
NOISE_MEAN, NOISE_STD = 0.5, 0.1


@dataclass(frozen=True)
class Settings:
    """Where and how runs compute: device, precision, kernels, CUDA-graph use (``resolve_settings``)."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    backend: str  # torch | triton
    cuda_graph: bool  # untiled steps are captured in a CUDA graph


@dataclass(frozen=True)
class Runtime(Settings):
    """The settings and the network, resolved once per render, batch option set or timing."""

    network: VGGFeatures
    weights_format: str = "torchvision"  # what the network's weights expect (vgg.py)
    weights_reason: str = ""  # why that format was chosen (--verbose)

    @property
    def weights_description(self) -> str:
        return f"{self.weights_format} ({self.weights_reason})"

    @property
    def ops(self):
        return kernel_ops(self.device, self.backend)

    @property
    def autocast(self):
        return autocast_for(self.precision, self.device)


def resolve_settings(config: RuntimeOptions, device: torch.device | None = None) -> Settings:
    """The one place precision, kernels and CUDA-graph use are decided from the options (errors
    for what this machine cannot do); ``device`` replaces the config's."""
    device = device if device is not None else resolve_device(config.device)
    return Settings(device=device, precision=resolve_precision(config.precision, device),
                    backend=resolve_backend(device, config.backend),
                    cuda_graph=device.type == "cuda" and config.cuda_graph)


def resolve_runtime(config: StyleConfig, device: torch.device | None = None, *, weights: str | None = None,
                    channels_last: bool = True) -> Runtime:
    """The settings of ``config`` and its network, the one place it is built (``weights`` replaces
    the config's, e.g. ``random`` for timing; ``channels_last=False`` keeps NCHW activations)."""
    settings = resolve_settings(config, device)
    loaded = load_network_weights(weights or config.weights, config.weights_format, seed=RANDOM_WEIGHTS_SEED,
                                  progress=not config.quiet)
    network = VGGFeatures(feature_layers(config), loaded.state, pooling=config.pooling, channels_last=channels_last,
                          weights_format=loaded.format)
    if settings.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # a run's shapes never change (autotuning is not deterministic)
    return Runtime(**vars(settings), network=network.to(settings.device), weights_format=loaded.format,
                   weights_reason=loaded.reason)


@dataclass
class Inputs:
    """What one run optimises, on the runtime's device: a batch of content images, their styles
    (one list shared by all samples, or one list per sample), optional start images, for one
    image spatial-control masks, and for video frames their temporal targets."""

    content: torch.Tensor  # (B, 3, H, W)
    styles: list
    start: torch.Tensor | None = None  # (B, 3, H, W); None: the configured initialisation
    regions: list | None = None
    style_regions: list | None = None
    temporal: tuple[TemporalTarget, ...] = ()


def initial_image(init: str, content: torch.Tensor, style: torch.Tensor, seed: int,
                  preserve_color: str = "none") -> torch.Tensor:
    """The starting image: (1, 3, H, W), fp32, contiguous (optimisers view it flat), on content's
    device.  ``init``: noise, content, style, or an image file (resized to the content's size and,
    for --preserve-color luminance, turned into its luminance as content and style are)."""
    if init == "content":
        return content.detach().float().clone(memory_format=torch.contiguous_format)
    if init not in INITS:  # an image file: stretched like a style image
        style = image_to_tensor(load_image(init)).to(content.device)
        if preserve_color == "luminance":
            style = color.luminance_image(style)
        init = "style"
    if init == "style":
        size = content.shape[-2:]
        return F.interpolate(style.float(), size=size, mode="bilinear", antialias=True,
                             align_corners=False).clamp_(0, 1).contiguous()
    if init == "noise":
        # Drawn on the CPU so the same seed gives the same start on every device.
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(content.shape, generator=generator) * NOISE_STD + NOISE_MEAN
        return noise.clamp_(0, 1).to(content.device)


def make_step(objective, optimizer, scaler: LossScaler | None = None, average: IterateAverage | None = None) -> Step:
    """One iteration: ``objective.loss_and_grad`` at ``image``, then the optimiser's in-place update
    (and the iterate average's, --average-decay).

    With a ``scaler`` (fp16) the gradient comes from the scaled loss and a step whose gradient
    overflowed is skipped on the device.  Nothing is read back to the host, so (untiled) the step
    can be captured in a CUDA graph.  Returns the per-sample losses (B,).
    """

    def step(image: torch.Tensor) -> torch.Tensor:
        losses, grad = objective.loss_and_grad(image, None if scaler is None else scaler.scale)
        if scaler is None:
            optimizer.update(image, grad)
        else:
            grad, ok = scaler.unscale(grad)
            optimizer.update(image, grad, ok)
            scaler.update(ok)
        if average is not None:
            average.update(image)
        return losses

    return step


class GraphedStep:
    """``step`` captured in a CUDA graph: calling it replays the whole iteration as one graph.

    Warm-up iterations run first, on a side stream as CUDA-graph capture requires: they compile
    the Triton kernels and let cuDNN benchmark its algorithms, so nothing is compiled or tuned
    during capture.  They also move the image and the optimiser, so both are put back afterwards
    (``reset`` restores the optimiser's, and the loss scaler's, freshly built state).
    """

    def __init__(self, step: Step, image: torch.Tensor, reset: Callable[[], None], warmup: int = 3):
        snapshot = image.detach().clone()
        side = torch.cuda.Stream(device=image.device)
        side.wait_stream(torch.cuda.current_stream(image.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(image)
        torch.cuda.current_stream(image.device).wait_stream(side)
        with torch.no_grad():
            image.copy_(snapshot)
        reset()
        del snapshot
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step(image)  # recorded, not run: the state is still the initial one

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        self.graph.replay()
        return self.loss


@dataclass
class Run:
    """An assembled run: the image (a leaf updated in place) and its step (eager or graphed)."""

    image: torch.Tensor
    step: Step
    objective: object  # StyleObjective, or tiling.Tiler
    optimizer: object
    scaler: LossScaler | None
    graphed: bool
    average: IterateAverage | None = None

    def output(self) -> torch.Tensor:
        """What the run puts out: the image, or with --average-decay the average of its iterates."""
        return self.image.detach() if self.average is None else self.average.value(self.image)

    def optimise(self, iterations: int, hooks: Hooks | None = None) -> RunResult:
        result = optimise(self.step, self.image, iterations, hooks or Hooks(), output=self.output)
        if self.scaler is not None:
            result.skipped_steps = int(self.scaler.skipped.item())
        return result


def make_objective(runtime: Runtime, config: StyleConfig, inputs: Inputs, *, tile: int | None = None, shard=None):
    """The objective of ``inputs``: targets and ``loss_and_grad``, untiled, or tile by tile when
    ``tile`` (px) is given (tiling.py; ``shard`` (distributed.py) spreads the tiles over processes)."""
    content, styles, options = inputs.content, inputs.styles, config.part(ObjectiveOptions)
    ops, autocast = runtime.ops, runtime.autocast
    if not tile:
        return StyleObjective(runtime.network, content, styles, options, ops=ops, autocast=autocast,
                              regions=inputs.regions, style_regions=inputs.style_regions, temporal=inputs.temporal)
    share = {} if shard is None else {"share": shard.share, "reduce": shard.reduce}
    features = TiledFeatures(runtime.network, ops, tile, config.tile_halo, autocast, **share)
    targets = StyleObjective(runtime.network, content, styles, options, ops=ops, autocast=autocast, features=features,
                             temporal=inputs.temporal)
    return Tiler(targets, features, content.shape[-2], content.shape[-1])


def build_run(runtime: Runtime, config: StyleConfig, inputs: Inputs, *, tile: int | None = None, shard=None) -> Run:
    """Objective (``make_objective``), start image, optimiser, loss scaler and step, captured in a
    CUDA graph when the runtime allows it and the run is untiled."""
    content, styles = inputs.content, inputs.styles
    objective = make_objective(runtime, config, inputs, tile=tile, shard=shard)
    if inputs.start is not None:
        image = inputs.start.detach().to(device=content.device, dtype=torch.float32).clone(
            memory_format=torch.contiguous_format)
    else:
        image = initial_image(config.init, content, styles[0], config.seed, config.preserve_color)
    image.requires_grad_(True)
    optimizer = make_optimizer(config.optimizer, image, config.step_size, config.lbfgs_history, config.lbfgs_steps)
    scaler = LossScaler(runtime.device) if runtime.precision == "fp16" else None
    average = IterateAverage(image, config.average_decay) if config.average_decay else None
    step = make_step(objective, optimizer, scaler, average)
    graphed = runtime.cuda_graph and not tile  # the one place graph capture is decided
    if graphed:
        def reset() -> None:
            for state in (optimizer, scaler, average):
                if state is not None:
                    state.reset()

        step = GraphedStep(step, image, reset)
    return Run(image=image, step=step, objective=objective, optimizer=optimizer, scaler=scaler, graphed=graphed,
               average=average)


# --------------------------------------------------------------------------------------------
# Timing and memory of a run: what the planner and the benchmark measure


def synthetic_inputs(size: int, device: torch.device) -> Inputs:
    """Seeded random content and style images of size x size: speed does not depend on them."""
    g = torch.Generator().manual_seed(0)
    content, style = (torch.rand(1, 3, size, size, generator=g).to(device) for _ in range(2))
    return Inputs(content=content, styles=[style])


def time_steps(step: Callable[[], object], device: torch.device, iterations: int, repeats: int
               ) -> tuple[float, tuple[float, float]]:
    """Median seconds per call of ``step()`` over ``repeats`` timed runs of ``iterations`` calls, and
    (min, max): CUDA events around the GPU work, a monotonic clock on the CPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(iterations):
                step()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(iterations):
                step()
            seconds = time.perf_counter() - begin
        times.append(seconds / iterations)
    return statistics.median(times), (min(times), max(times))


def time_run(run: Run, iterations: int, repeats: int, warmup: int) -> tuple[float, tuple[float, float]]:
    """Seconds per iteration of ``run``; an eager step is warmed up first (a graphed one was, before
    capture)."""
    if not run.graphed:
        for _ in range(warmup):
            run.step(run.image)
    return time_steps(lambda: run.step(run.image), run.image.device, iterations, repeats)


def buffer_bytes_per_pixel(config: StyleConfig) -> float:
    """Image-sized fp32 buffers of a run per output pixel: image, gradient, the loop's two copies
    (last finite image, candidate), optimiser state, and the content targets."""
    image = 3 * 4
    optimizer = (2 * config.lbfgs_history + 4) * image if config.optimizer == "lbfgs" else 2 * image
    targets = sum(4 * layer_channels(name) / layer_stride(name) ** 2 for name in config.content_layers)
    return 4 * image + optimizer + targets


def calibrate(config: StyleConfig, device: torch.device, sizes: tuple[int, int] = (256, 512)) -> MemoryModel:
    """The planner's model, measured: peak memory and s/iter of the untiled step (random weights)
    at two sizes, fitted as fixed + per_pixel * pixels.  256 vs 512 px: far enough apart that the
    memory difference stands clear of allocator noise (128 vs 256 px on the CPU gave slopes
    varying 2x between runs; 256 vs 512 px within 10%)."""
    runtime = resolve_runtime(config, device, weights="random")
    points = []
    for size in sizes:
        reset_peak(device)
        run = build_run(runtime, config, synthetic_inputs(size, device))  # untiled: no tile given
        seconds, _ = time_run(run, iterations=2, repeats=1, warmup=1)
        points.append((size * size, float(peak_bytes(device) or 0), seconds))
        del run
    (p0, m0, t0), (p1, m1, t1) = points
    per_pixel = max((m1 - m0) / (p1 - p0), 0.0)
    seconds_per_pixel = max((t1 - t0) / (p1 - p0), t1 / p1 / 4)
    return MemoryModel(fixed_bytes=max(m1 - per_pixel * p1, 0.0), bytes_per_pixel=per_pixel,
                       buffer_bytes_per_pixel=buffer_bytes_per_pixel(config),
                       seconds_fixed=max(t1 - seconds_per_pixel * p1, 0.0), seconds_per_pixel=seconds_per_pixel,
                       halo=exact_halo(feature_layers(config)) if config.tile_halo is None else config.tile_halo,
                       calibration_sizes=tuple(sizes))
