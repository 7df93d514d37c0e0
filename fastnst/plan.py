"""The memory planner: predicted peak memory and time per iteration, untiled and tiled.

The model is measured, not guessed: ``calibrate`` runs the real untiled step at two small sizes on
the device and fits peak memory and seconds per iteration as ``fixed + per_pixel * pixels``.
The per-pixel memory splits into image-sized buffers, known exactly (image, gradient, the run
loop's two copies, optimiser state, content targets), and activations, the measured remainder.
A tiled run holds the image-sized buffers for the whole image but activations only for one tile
with its halo, so

    untiled peak = fixed + per_pixel * pixels
    tiled peak   = fixed + activations_per_pixel * tile_region_pixels + buffers_per_pixel * pixels

and a tiled iteration costs about 1.5 untiled ones over the tile regions (pass 1 is a forward,
pass 2 a forward and a backward).  ``auto_tile`` picks the largest tile whose tiled peak fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import StyleConfig
from .errors import RunError
from .objective import feature_layers
from .tiling import ALIGN, exact_halo, tile_grid
from .vgg import layer_channels, layer_stride

SAFETY = 0.85  # use at most this share of the free memory: allocator fragmentation, other users


@dataclass
class MemoryModel:
    fixed_bytes: float
    bytes_per_pixel: float  # untiled: everything that grows with the image
    buffer_bytes_per_pixel: float  # the image-sized buffers among them (exact)
    seconds_fixed: float
    seconds_per_pixel: float
    halo: int
    calibration_sizes: tuple[int, ...]

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

    def tiled_seconds(self, height: int, width: int, tile: int) -> float:
        tiles = tile_grid(height, width, tile, self.halo)
        regions = sum((t.region[1] - t.region[0]) * (t.region[3] - t.region[2]) for t in tiles)
        return self.seconds_fixed * len(tiles) + 1.5 * self.seconds_per_pixel * regions


def buffer_bytes_per_pixel(config: StyleConfig) -> float:
    """Image-sized fp32 buffers per pixel of the output: image, gradient, the run loop's two copies
    (last finite image, candidate), optimiser state, and the content targets."""
    image = 3 * 4
    optimizer = (2 * config.lbfgs_history + 2) * image if config.optimizer == "lbfgs" else 2 * image
    targets = sum(4 * layer_channels(name) / layer_stride(name) ** 2 for name in config.content_layers)
    return 4 * image + optimizer + targets


def calibration_sizes(device: torch.device) -> tuple[int, int]:
    """Two sizes far enough apart that the memory difference stands clear of allocator noise
    (on the CPU, 128 vs 256 px gave slopes varying 2x between runs; 256 vs 512 px within 10%)."""
    return (256, 512)


def calibrate(config: StyleConfig, device: torch.device, sizes: tuple[int, int] | None = None) -> MemoryModel:
    """Measure peak memory and s/iter of the untiled step at two sizes and fit the model."""
    from .bench import time_step

    sizes = sizes or calibration_sizes(device)
    points = []
    for size in sizes:
        timing = time_step(size, config=config.replace(tile=None, scales=None, start_size=None,
                                                        scale_iterations=None),
                           device=str(device), iterations=2, repeats=1, warmup=1)
        points.append((size * size, float(timing.peak_memory_bytes or 0), timing.seconds_per_iteration))
    (p0, m0, t0), (p1, m1, t1) = points
    per_pixel = max((m1 - m0) / (p1 - p0), 0.0)
    seconds_per_pixel = max((t1 - t0) / (p1 - p0), t1 / p1 / 4)
    return MemoryModel(fixed_bytes=max(m1 - per_pixel * p1, 0.0), bytes_per_pixel=per_pixel,
                       buffer_bytes_per_pixel=buffer_bytes_per_pixel(config),
                       seconds_fixed=max(t1 - seconds_per_pixel * p1, 0.0), seconds_per_pixel=seconds_per_pixel,
                       halo=exact_halo(feature_layers(config)) if config.tile_halo is None else config.tile_halo,
                       calibration_sizes=tuple(sizes))


def free_bytes(device: torch.device) -> int | None:
    from .bench import available_bytes

    return available_bytes(device)


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


def plan_lines(config: StyleConfig, device: torch.device, height: int, width: int) -> list[str]:
    """What ``fastnst plan`` prints."""
    from .devices import run_metadata
    from .optim import lbfgs_state_bytes

    model = calibrate(config, device)
    free = free_bytes(device)
    gib = 2**30
    lines = [f"device: {run_metadata()['device']}, "
             + (f"free memory {free / gib:.1f} GiB" if free else "free memory unknown"),
             f"measured at {model.calibration_sizes[0]} and {model.calibration_sizes[1]} px "
             f"({config.optimizer}, precision {config.precision}): {model.fixed_bytes / gib:.2f} GiB + "
             f"{model.bytes_per_pixel / 1024:.2f} KiB/px ({model.buffer_bytes_per_pixel / 1024:.2f} KiB/px "
             f"image-sized buffers), {model.seconds_per_pixel * 1e6:.3f} us/px per iteration",
             f"untiled {width}x{height}: peak {model.untiled_peak(height, width) / gib:.2f} GiB, "
             f"~{model.untiled_seconds(height, width):.3g} s/iter"
             + ("" if not free or model.untiled_peak(height, width) <= SAFETY * free else " (does not fit)")]
    if free:
        try:
            tile = auto_tile(model, height, width, free)
        except RunError as exc:
            lines.append(f"tiled: {exc}")
            tile = None
        else:
            if tile is None:
                lines.append("--tile auto: untiled (the whole image fits)")
    else:
        tile = None
    shown_tile = tile or min(1024, (max(height, width) + ALIGN - 1) // ALIGN * ALIGN)
    count = len(tile_grid(height, width, shown_tile, model.halo))
    lines.append(f"tiled with {shown_tile} px tiles ({count} tiles, halo {model.halo} px)"
                 f"{' = --tile auto' if tile else ''}: peak {model.tiled_peak(height, width, shown_tile) / gib:.2f} "
                 f"GiB, ~{model.tiled_seconds(height, width, shown_tile):.3g} s/iter")
    if config.optimizer == "lbfgs":
        lines.append(f"L-BFGS state (--lbfgs-history {config.lbfgs_history}): "
                     f"{lbfgs_state_bytes(config.lbfgs_history, height * width) / gib:.2f} GiB")
    return lines
