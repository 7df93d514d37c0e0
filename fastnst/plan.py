"""``fastnst plan``: predicted peak memory and time per iteration, untiled and tiled, on this device.

The model is measured (``run.calibrate``: the real untiled step at two small sizes, fitted as
``fixed + per_pixel * pixels``) and read by ``measure.MemoryModel``: a tiled run holds the
image-sized buffers for the whole image but activations only for one tile with its halo, and a
tiled iteration costs about 1.5 untiled ones over the tile regions (pass 1 is a forward, pass 2 a
forward and a backward).  ``measure.auto_tile`` is the tile ``--tile auto`` picks.
"""

from __future__ import annotations

import torch

from .devices import run_metadata
from .errors import RunError
from .measure import SAFETY, MemoryModel, auto_tile, free_bytes
from .optim import lbfgs_state_bytes
from .run import calibrate
from .tiling import ALIGN, tile_grid


def tiled_seconds(model: MemoryModel, height: int, width: int, tile: int) -> float:
    tiles = tile_grid(height, width, tile, model.halo)
    regions = sum((t.region[1] - t.region[0]) * (t.region[3] - t.region[2]) for t in tiles)
    return model.seconds_fixed * len(tiles) + 1.5 * model.seconds_per_pixel * regions


def plan_lines(config, device: torch.device, height: int, width: int) -> list[str]:
    """What ``fastnst plan`` prints."""
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
    tile = None
    if free:
        try:
            tile = auto_tile(model, height, width, free)
        except RunError as exc:
            lines.append(f"tiled: {exc}")
        else:
            if tile is None:
                lines.append("--tile auto: untiled (the whole image fits)")
    shown_tile = tile or min(1024, (max(height, width) + ALIGN - 1) // ALIGN * ALIGN)
    count = len(tile_grid(height, width, shown_tile, model.halo))
    lines.append(f"tiled with {shown_tile} px tiles ({count} tiles, halo {model.halo} px)"
                 f"{' = --tile auto' if tile else ''}: peak {model.tiled_peak(height, width, shown_tile) / gib:.2f} "
                 f"GiB, ~{tiled_seconds(model, height, width, shown_tile):.3g} s/iter")
    if config.optimizer == "lbfgs":
        lines.append(f"L-BFGS state (--lbfgs-history {config.lbfgs_history}): "
                     f"{lbfgs_state_bytes(config.lbfgs_history, height * width) / gib:.2f} GiB")
    return lines
