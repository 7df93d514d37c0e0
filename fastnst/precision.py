"""Mixed precision: which dtype the network runs in, autocast, and fp16 loss scaling.

The image and the optimiser state are always fp32; only VGG's activations drop to bf16 or fp16
(under autocast), and the Gram matrices and losses accumulate in fp32 whatever the activations.
fp16 has a narrow exponent range, so its gradients are computed from a scaled loss and checked
for overflow on the device (``LossScaler``): a step whose gradient overflowed is skipped and the
scale lowered, as torch.amp.GradScaler does, without a host sync.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .config import PRECISIONS
from .errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> str | None:
    """What computes bf16 natively on ``device`` (named for messages), or None.

    CUDA GPUs that support bf16; CPUs with AMX or AVX-512 BF16, where oneDNN's bf16 convolutions
    run at about twice the fp32 rate (measured: 0.58x the seconds per iteration at 384 px on an
    AMD EPYC with AVX-512 BF16).  Elsewhere bf16 is emulated and slower than fp32.
    """
    if device.type == "cuda":
        return "this GPU's bf16 tensor cores" if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    for feature, probe in (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported")):
        supported = getattr(torch.cpu, probe, None)  # private probes: absent in some torch builds
        if supported is not None and supported():
            return f"this CPU's {feature} instructions"
    return None


def resolve_precision(name: str, device: torch.device) -> str:
    """The concrete precision: ``auto`` is bf16 where the hardware computes it natively
    (``native_bf16``), fp32 otherwise."""
    if name not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{name}'")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; use --precision fp16 or fp32")
    return name


def precision_reason(name: str, device: torch.device) -> str:
    """Why ``--precision name`` computes in what it does on ``device``, for --verbose and info."""
    if name != "auto":
        return "asked for"
    hardware = native_bf16(device)
    if hardware:
        return f"auto: {hardware} compute bf16 natively; --precision fp32 for bit-faithful runs"
    if device.type == "cpu":
        return "auto: this CPU has neither AMX nor AVX-512 BF16, so bf16 would be emulated"
    return "auto: no native bf16 on this device"


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the network runs in: autocast for bf16/fp16, nothing for fp32.

    The autocast weight cache is off: it is unsafe inside CUDA-graph capture, and VGG's weights
    are cast once per iteration either way.
    """
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = _DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)


class LossScaler:
    """Dynamic loss scale kept on the device.

    ``unscale`` divides the gradient of (loss * scale) by the scale and reports, as a device bool,
    whether it is finite; ``update`` then halves the scale after an overflow or doubles it after
    ``interval`` good steps in a row.  The scale never drops below 1: a gradient that overflows
    even unscaled is the loss's problem, which the run loop's NaN check reports.
    """

    def __init__(self, device: torch.device, initial: float = 2.0**16, growth: float = 2.0,
                 backoff: float = 0.5, interval: int = 200):
        self.initial = initial
        self.scale = torch.full((), initial, device=device)
        self.good_steps = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.growth, self.backoff, self.interval = growth, backoff, interval

    def reset(self) -> None:
        """Back to the initial scale (used after warm-up iterations)."""
        self.scale.fill_(self.initial)
        self.good_steps.zero_()
        self.skipped.zero_()

    def unscale(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad = grad.float() / self.scale
        return grad, torch.isfinite(grad).all()

    def update(self, ok: torch.Tensor) -> None:
        good = torch.where(ok, self.good_steps + 1, torch.zeros_like(self.good_steps))
        grow = good >= self.interval
        new_scale = torch.where(ok, torch.where(grow, self.scale * self.growth, self.scale),
                                torch.clamp(self.scale * self.backoff, min=1.0))
        self.scale.copy_(new_scale)
        self.good_steps.copy_(torch.where(grow, torch.zeros_like(good), good))
        self.skipped.add_((~ok).long())
