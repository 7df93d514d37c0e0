"""Measurement at the bottom of the house: memory probes, the cost model, device peaks, the memory model.

Needs nothing of the package but its errors, so every floor above (the run, render, batch, the
planner, bench) reads memory, counts FLOPs and sizes runs the same way.

Cost model (``../shared/reference/baselines.md``, VGG19 through conv5_1, per input pixel):
convolutions 722,304 FLOPs forward and about as much backward to the input; Gram matrices of
conv1_1..conv5_1 34,816 (full, as the textbook computes them); the style gradient (G - A) F
34,816; 323 activation elements kept for backward.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from .errors import RunError

CONV_FLOPS_PER_PIXEL = 722_304  # forward; backward to the input costs about the same
GRAM_FLOPS_PER_PIXEL = 34_816  # all five style Grams, full matrices
STYLE_GRAD_FLOPS_PER_PIXEL = 34_816  # (G - A) F for the five style layers
ACTIVATION_ELEMENTS_PER_PIXEL = 323  # kept for backward
# Plan for at most this share of the free memory: allocator fragmentation, other users.
SAFETY = 0.85
ALIGN = 16  # tile interiors start on multiples of this: 2^4 poolings before conv5_1
# Dense peak rates (TFLOP/s) by device name and precision: datasheets, via baselines.md.
PEAK_TFLOPS = {"H100": {"bf16": 989, "fp16": 989, "fp32": 67}, "H200": {"bf16": 989, "fp16": 989, "fp32": 67},
               "A100": {"bf16": 312, "fp16": 312, "fp32": 19.5}}


def model_flops(height: int, width: int) -> float:
    """FLOPs of one iteration by the cost model: conv forward + backward, Grams, style gradient."""
    per_pixel = 2 * CONV_FLOPS_PER_PIXEL + GRAM_FLOPS_PER_PIXEL + STYLE_GRAD_FLOPS_PER_PIXEL
    return float(per_pixel * height * width)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The datasheet's dense rate for a known GPU in this precision; None for others."""
    for name, peaks in PEAK_TFLOPS.items():
        if name in device_name and precision in peaks:
            return peaks[precision]
    return None


def _proc_bytes(path: str, key: str) -> int | None:
    """A "Key:   N kB" line of a Linux /proc file, in bytes; None elsewhere."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a run on ``device``: CUDA free memory, or MemAvailable on Linux; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's peak resident set (Linux)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int | None:
    """Peak memory since the last reset: CUDA max allocated, or the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_bytes("/proc/self/status", "VmHWM")


def release(device: torch.device) -> None:
    """Give back what a failed or finished run held (after its tensors went out of scope)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


@dataclass
class MemoryModel:
    """Peak memory and seconds per iteration as ``fixed + per_pixel * pixels``.

    The per-pixel memory splits into image-sized buffers (known exactly: image, gradient, the run
    loop's copies, optimiser state, content targets) and activations (the rest).  A tiled run
    holds the buffers for the whole image but activations only for one tile with its halo.  The
    planner measures a model on the device (run.calibrate); ``prior`` states one from the cost
    model alone, to refuse sizes that cannot fit before trying them.
    """

    fixed_bytes: float
    bytes_per_pixel: float  # untiled: everything that grows with the image
    buffer_bytes_per_pixel: float  # the image-sized buffers among them (exact)
    seconds_fixed: float
    seconds_per_pixel: float
    halo: int
    calibration_sizes: tuple[int, ...]

    @classmethod
    def prior(cls, buffer_bytes_per_pixel: float, element_bytes: int, copies: int = 1) -> "MemoryModel":
        """From the cost model: activations kept for backward plus as much again transient in
        backward, ``copies`` times (the textbook reference keeps two), the buffers, 100 MiB fixed."""
        activations = 2 * ACTIVATION_ELEMENTS_PER_PIXEL * element_bytes * copies
        return cls(fixed_bytes=100 * 2**20, bytes_per_pixel=activations + buffer_bytes_per_pixel,
                   buffer_bytes_per_pixel=buffer_bytes_per_pixel, seconds_fixed=0.0, seconds_per_pixel=0.0,
                   halo=0, calibration_sizes=())

    @property
    def activation_bytes_per_pixel(self) -> float:
        return max(self.bytes_per_pixel - self.buffer_bytes_per_pixel, 0.0)

    def untiled_peak(self, height: int, width: int) -> float:
        return self.fixed_bytes + self.bytes_per_pixel * height * width

    def tiled_peak(self, height: int, width: int, tile: int) -> float:
        region = min(tile + 2 * self.halo, height) * min(tile + 2 * self.halo, width)
        return (self.fixed_bytes + self.activation_bytes_per_pixel * region
                + self.buffer_bytes_per_pixel * height * width)

    def untiled_seconds(self, height: int, width: int) -> float:
        return self.seconds_fixed + self.seconds_per_pixel * height * width


def auto_tile(model: MemoryModel, height: int, width: int, free: float) -> int | None:
    """None when the untiled run fits, else the largest tile (multiple of 16) whose run fits."""
    budget = SAFETY * free
    if model.untiled_peak(height, width) <= budget:
        return None
    largest = (max(height, width) + ALIGN - 1) // ALIGN * ALIGN
    for tile in range(largest, ALIGN - 1, -ALIGN):
        if model.tiled_peak(height, width, tile) <= budget:
            return tile
    need = model.fixed_bytes + model.buffer_bytes_per_pixel * height * width
    raise RunError(f"{width}x{height} px does not fit even in 16-px tiles: the image-sized buffers alone "
                   f"need about {need / 2**30:.1f} GiB of {free / 2**30:.1f} GiB free; lower "
                   f"--lbfgs-history, use --optimizer adam, or a smaller --size")
