"""The optimisation loop: steps, progress bar, checkpoints, Ctrl-C, the non-finite-loss check.

The step returns each sample's loss as a device tensor; the loop reads them back only every
``report_every`` iterations on CUDA (every iteration on the CPU, where reading is free), so the
step itself never waits for the host and can be one CUDA-graph replay.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteLossError

Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Hooks:
    """What the loop reports and obeys."""

    report_every: int = 10  # on CUDA, read the losses every this many iterations
    progress: bool = True
    label: str = ""
    checkpoint: Callable[[int, torch.Tensor], None] | None = None
    checkpoint_every: int = 0
    should_stop: Callable[[], bool] = lambda: False  # polled before each step (Ctrl-C)
    on_loss: Callable[[int, float], None] | None = None


@dataclass
class RunResult:
    image: torch.Tensor  # (B, 3, H, W) on the CPU, clipped to [0, 1]
    iterations: int  # iterations completed
    loss: float | None  # the last loss read back, summed over the batch
    seconds: float
    interrupted: bool = False
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, loss) as read
    sample_losses: list[float] = field(default_factory=list)  # each sample's last loss read
    skipped_steps: int = 0  # fp16 steps skipped because the gradient overflowed
    device: str = "cpu"
    precision: str = "fp32"
    backend: str = "torch"
    cuda_graph: bool = False
    tile: int | None = None  # tile size of the (last) scale, None when untiled
    peak_memory_bytes: int | None = None
    weights: str = ""  # the weights format and why it was chosen (--verbose)


def optimise(step: Step, image: torch.Tensor, iterations: int, hooks: Hooks,
             output: Callable[[], torch.Tensor] | None = None) -> RunResult:
    """Run ``iterations`` steps on ``image`` (a leaf that requires grad, updated in place).

    ``output`` gives what checkpoints, interruptions and the result hold (default: the image; the
    average of the iterates with --average-decay).  Raises NonFiniteLossError when a loss read back
    is NaN or infinite; it carries the last output whose loss was finite.
    """
    output = output or image.detach
    read_every = 1 if image.device.type == "cpu" else hooks.report_every
    last_good = output().clone()
    candidate = torch.empty_like(last_good)
    last_good_iteration, loss_value, losses, sample_losses = 0, None, [], []
    interrupted = False
    started = time.perf_counter()
    with tqdm(total=iterations, disable=not hooks.progress, unit="it", desc=f"stylize {hooks.label}".strip(),
              dynamic_ncols=True, leave=False) as bar:
        done = 0
        for i in range(1, iterations + 1):
            if hooks.should_stop():
                interrupted = True
                break
            read = i % read_every == 0 or i == iterations
            if read:
                candidate.copy_(output())  # the losses about to be read are this image's
            values = step(image)
            done = i
            if read:
                sample_losses = values.tolist()
                loss_value = math.fsum(sample_losses)
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"the loss became {loss_value} at iteration {i} (a step size --lr too large "
                        f"for these weights is the usual cause)",
                        last_image=last_good.cpu().clamp_(0, 1), last_iteration=last_good_iteration)
                last_good, candidate = candidate, last_good
                last_good_iteration = i - 1
                losses.append((i, loss_value))
                bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
                if hooks.on_loss is not None:
                    hooks.on_loss(i, loss_value)
            bar.update(1)  # after the postfix: the bar drawn at i shows iteration i's loss, not i - 1's
            if hooks.checkpoint is not None and hooks.checkpoint_every and i % hooks.checkpoint_every == 0:
                hooks.checkpoint(i, _readout(output(), last_good))
    seconds = time.perf_counter() - started
    return RunResult(image=_readout(output(), last_good), iterations=done, loss=loss_value, seconds=seconds,
                     interrupted=interrupted, losses=losses, sample_losses=sample_losses)


def _readout(current: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """The current output clipped to [0, 1] on the CPU; the fallback if it holds NaN or inf."""
    if not bool(torch.isfinite(current).all()):
        current = fallback
    return current.float().cpu().clamp(0, 1)
