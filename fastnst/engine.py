"""The run loop: one fixed-shape step per iteration, progress, checkpoints, interruption.

An iteration is ``step(image) -> loss``: the objective's forward and backward at the current
image and the optimiser's in-place update, all on the device with buffers of fixed shape and no
host synchronisation.  The loop around it is the only place that reads values back, and only
every ``report_every`` iterations on CUDA (every iteration on the CPU, where reading is free), so
the step can later be captured in a CUDA graph and replayed without changing this file's shape.

On CUDA the step is captured once in a CUDA graph (``GraphedStep``) after warm-up iterations
that compile the Triton kernels and let cuDNN pick its algorithms; every iteration is then one
graph replay.  ``--no-cuda-graph`` and the CPU run the very same step function eagerly.

The image is optimised unconstrained by L-BFGS: clamping it inside the loop would make the
stored steps s differ from the steps the gradients y saw, corrupting the curvature pairs.  The
content and style terms keep it near the valid range; the result is clipped to [0, 1] when it is
read out.  Adam projects onto [0, 1] after every update (see optim.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import NonFiniteLossError
from .optim import make_optimizer
from .precision import LossScaler, autocast_for

# Noise initialisation: mid-grey plus Gaussian noise of this standard deviation, so that the
# start is white noise (the paper's choice) yet stays inside the valid pixel range.
NOISE_MEAN, NOISE_STD = 0.5, 0.1

Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RunResult:
    image: torch.Tensor  # (1, 3, H, W) on the CPU, clipped to [0, 1]
    iterations: int  # iterations completed
    loss: float | None  # the last loss read back
    seconds: float
    interrupted: bool = False
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) as read
    skipped_steps: int = 0  # fp16 steps skipped because the gradient overflowed
    device: str = "cpu"
    precision: str = "fp32"
    backend: str = "torch"
    cuda_graph: bool = False
    tile: int | None = None  # tile size of the (last) scale, None when untiled
    peak_memory_bytes: int | None = None


def initial_image(init: str, content: torch.Tensor, style: torch.Tensor, seed: int) -> torch.Tensor:
    """The starting image: (1, 3, H, W), fp32, contiguous (optimisers view it flat), on content's device."""
    if init == "content":
        return content.detach().float().clone(memory_format=torch.contiguous_format)
    if init == "style":
        size = content.shape[-2:]
        return F.interpolate(style.float(), size=size, mode="bilinear", antialias=True,
                             align_corners=False).clamp_(0, 1).contiguous()
    if init == "noise":
        # Drawn on the CPU so the same seed gives the same start on every device.
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(content.shape, generator=generator) * NOISE_STD + NOISE_MEAN
        return noise.clamp_(0, 1).to(content.device)
    raise ValueError(f"unknown init '{init}'")


def make_step(objective: Callable[[torch.Tensor], torch.Tensor], optimizer,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
              scaler: LossScaler | None = None) -> Step:
    """One iteration: loss and gradient at ``image``, then the optimiser's in-place update.

    The network runs under ``autocast`` (mixed precision); with a ``scaler`` (fp16) the gradient
    comes from the scaled loss and a step whose gradient overflowed is skipped on the device.
    An objective that computes its own gradient (the tiled one) provides
    ``loss_and_grad(image, scale)`` and is used as is.  The function reads nothing back to the
    host, so (untiled) it can be captured in a CUDA graph.
    """

    def step(image: torch.Tensor) -> torch.Tensor:
        scale = None if scaler is None else scaler.scale
        if hasattr(objective, "loss_and_grad"):
            loss, grad = objective.loss_and_grad(image, scale)
        else:
            with autocast():
                loss = objective(image)
            (grad,) = torch.autograd.grad(loss if scale is None else loss * scale, image)
        if scaler is None:
            optimizer.update(image, grad)
        else:
            grad, ok = scaler.unscale(grad)
            optimizer.update(image, grad, ok)
            scaler.update(ok)
        return loss.detach()

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
class PreparedRun:
    """Everything an optimisation needs, built on one device: the image and its step."""

    image: torch.Tensor  # the optimised image, a leaf updated in place
    step: Step  # eager, or a GraphedStep replaying it
    objective: Callable[[torch.Tensor], torch.Tensor]
    optimizer: object
    scaler: LossScaler | None


def prepare(network, content: torch.Tensor, styles: list[torch.Tensor], config, precision: str,
            graphed: bool, tile: int | None = None, start: torch.Tensor | None = None,
            shard=None, regions=None, style_regions=None) -> PreparedRun:
    """Targets, initial image, optimiser, loss scaler and step (captured when ``graphed``).

    ``content`` and ``styles`` are image tensors on the network's device; ``precision`` is a
    resolved one (fp32, bf16, fp16).  ``tile`` (px) evaluates the objective tile by tile
    (tiling.py; never graphed); ``start`` replaces the configured initial image (multi-scale);
    ``shard`` (distributed.py) spreads tiles over processes; ``regions`` / ``style_regions`` are
    spatial-control masks (objective.py).  Shared by real runs and by the
    benchmarks, so both time the same thing.
    """
    from .objective import StyleObjective  # objective imports kernels; keep engine import light

    device = content.device
    autocast = autocast_for(precision, device)
    if tile:
        from .tiling import TiledObjective

        extra = {} if shard is None else {"share": shard.share, "reduce": shard.reduce}
        objective = TiledObjective(network, content, styles, config, tile=tile, halo=config.tile_halo,
                                   autocast=autocast, **extra)
        graphed = False
    else:
        with autocast():  # targets in the precision the image's features will have
            objective = StyleObjective(network, content, styles, config, regions=regions,
                                       style_regions=style_regions)
    if start is not None:
        image = start.detach().to(device=device, dtype=torch.float32).contiguous().requires_grad_(True)
    else:
        image = initial_image(config.init, content, styles[0], config.seed).requires_grad_(True)
    optimizer = make_optimizer(config.optimizer, image, config.step_size, config.lbfgs_history)
    scaler = LossScaler(device) if precision == "fp16" else None
    step = make_step(objective, optimizer, autocast, scaler)
    if graphed:
        def reset() -> None:
            optimizer.reset()
            if scaler is not None:
                scaler.reset()

        step = GraphedStep(step, image, reset)
    return PreparedRun(image=image, step=step, objective=objective, optimizer=optimizer, scaler=scaler)


def optimise(step: Step, image: torch.Tensor, iterations: int, *, report_every: int = 10,
             progress: bool = True, checkpoint: Callable[[int, torch.Tensor], None] | None = None,
             checkpoint_every: int = 0, should_stop: Callable[[], bool] = lambda: False,
             label: str = "", on_loss: Callable[[int, float], None] | None = None) -> RunResult:
    """Run ``iterations`` steps on ``image`` (a leaf that requires grad, updated in place).

    Raises NonFiniteLossError when a loss read back is NaN or infinite; it carries the last image
    whose loss was finite.  ``should_stop`` is polled before each step (Ctrl-C handling).
    """
    read_every = 1 if image.device.type == "cpu" else report_every
    last_good = image.detach().clone()
    candidate = torch.empty_like(last_good)
    last_good_iteration, loss_value, losses = 0, None, []
    interrupted = False
    started = time.perf_counter()
    with tqdm(total=iterations, disable=not progress, unit="it", desc=f"stylize {label}".strip(),
              dynamic_ncols=True, leave=False) as bar:
        done = 0
        for i in range(1, iterations + 1):
            if should_stop():
                interrupted = True
                break
            read = i % read_every == 0 or i == iterations
            if read:
                candidate.copy_(image.detach())  # the loss about to be read is this image's
            loss = step(image)
            done = i
            bar.update(1)
            if read:
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"the loss became {loss_value} at iteration {i} (a step size --lr too large "
                        f"for these weights is the usual cause)",
                        last_image=last_good.cpu().clamp_(0, 1), last_iteration=last_good_iteration)
                last_good, candidate = candidate, last_good
                last_good_iteration = i - 1
                losses.append((i, loss_value))
                bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
                if on_loss is not None:
                    on_loss(i, loss_value)
            if checkpoint is not None and checkpoint_every and i % checkpoint_every == 0:
                checkpoint(i, _readout(image, last_good))
    seconds = time.perf_counter() - started
    return RunResult(image=_readout(image, last_good), iterations=done, loss=loss_value, seconds=seconds,
                     interrupted=interrupted, losses=losses)


def _readout(image: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """The current image clipped to [0, 1] on the CPU; the fallback if it holds NaN or inf."""
    current = image.detach()
    if not bool(torch.isfinite(current).all()):
        current = fallback
    return current.float().cpu().clamp(0, 1)
