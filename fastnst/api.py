"""The Python API: stylise content images with style images, from paths, PIL images or tensors.

``render`` does the work and returns the full ``RunResult`` (the CLI uses it to save, report and
handle interruption); ``stylize`` is the one-call convenience that returns a PIL image.  A render
is a loop over scales of a batch of one: each scale is one run built by ``run.build_run``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from . import color
from .config import INITS, StyleConfig, in_api_terms
from .devices import resolve_device
from .errors import CLI_CALLER, ConfigError, FastNSTError, NonFiniteLossError, RunError
from .files import check_writable
from .images import image_to_tensor, load_image, resized, resized_style, tensor_to_image
from .loop import Hooks, RunResult
from .measure import ALIGN, MemoryModel, auto_tile, free_bytes, is_out_of_memory, peak_bytes, release, reset_peak
from .objective import check_fits, feature_layers
from .run import Inputs, Runtime, build_run, calibrate, resolve_runtime


def _as_list(styles) -> list:
    if isinstance(styles, (list, tuple)):
        return list(styles)
    return [styles]


@dataclass
class _Sources:
    """The decoded inputs of a render, before any resizing."""

    content: Image.Image
    styles: list[Image.Image]
    masks: tuple | None  # (content masks or None, style masks or Nones) as grey images

    def at(self, size: int, style_scale: float, resample: str) -> tuple[Image.Image, list[Image.Image]]:
        """Content and style images resized (with the ``resample`` filter) for a scale whose longest
        side is ``size``."""
        return (resized(self.content, size, resample),
                [resized_style(image, size, style_scale, resample) for image in self.styles])


@dataclass
class _Scale:
    """One scale of a render: its inputs, iterations and the loop's hooks."""

    inputs: Inputs
    size: tuple[int, int]  # (width, height)
    iterations: int
    hooks: Hooks


def _in_api_terms(function):
    """``function``'s FastNSTErrors name its own arguments (config.in_api_terms), not CLI flags,
    unless the CLI is the caller; the error keeps its type and attributes."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FastNSTError as exc:
            if not CLI_CALLER.get() and exc.args and isinstance(exc.args[0], str):
                exc.args = (in_api_terms(exc.args[0]), *exc.args[1:])
            raise

    return wrapper


@_in_api_terms
def render(content, styles, config: StyleConfig | None = None, *,
           checkpoint: Callable[[int, torch.Tensor], None] | None = None,
           should_stop: Callable[[], bool] = lambda: False,
           notify: Callable[[str], None] | None = None, shard=None, **overrides) -> RunResult:
    """Stylise ``content`` with ``styles`` (one or several) and return the run's result.

    ``notify`` receives one-line notes on decisions taken during the run (tile size chosen,
    out-of-memory fallback); by default they go to the ``fastnst`` logger.  ``shard``
    (distributed.py) spreads the tiles over processes.
    """
    config = (config or StyleConfig()).replace(**overrides)
    styles = _as_list(styles)
    if not styles:
        raise ConfigError("at least one style image is needed")
    config.validate(n_styles=len(styles))
    notify = notify or logging.getLogger("fastnst").warning
    device = shard.device if shard is not None else resolve_device(config.device)
    tiling = _Tiling(config.tile or ("auto" if shard is not None else None),  # tiles are what processes share
                     config, device, notify)
    if shard is not None and config.tiling_blocker() is not None:
        raise ConfigError(f"{config.tiling_blocker()} cannot run under torchrun yet (processes share an image's tiles)")
    sources = _load(content, styles, config)
    log = _loss_log(config.log)
    runtime = resolve_runtime(config, device)
    if config.preset == "gatys2016" and runtime.weights_format != "caffe-normalised":
        notify(f"--preset gatys2016 on {runtime.weights_format} weights: the paper's alpha/beta belong to the "
               f"normalised VGG19 (--weights vgg_conv.pth); expect another balance of content and style")
    reset_peak(device)
    results, tiles_used, previous, done = [], [], None, 0
    sizes = config.scale_sizes()
    for index, size in enumerate(sizes):
        content_image, style_images = sources.at(size, config.style_scale, config.resample)
        original = image_to_tensor(content_image)
        label = f"{size} px" + (f" ({index + 1}/{len(sizes)})" if len(sizes) > 1 else "")

        def scale_checkpoint(iteration, image, offset=done, original=original):
            if checkpoint is not None:
                checkpoint(offset + iteration, color.finish(config.preserve_color, image, original))

        def on_loss(iteration, loss, offset=done, size=size):
            if log is not None:
                log({"iteration": offset + iteration, "loss": loss, "size": size})

        hooks = Hooks(report_every=config.report_every, progress=not config.quiet, label=label,
                      checkpoint=scale_checkpoint, checkpoint_every=config.save_every, should_stop=should_stop,
                      on_loss=on_loss)
        scale = _Scale(_inputs(runtime, config, sources, content_image, style_images, previous),
                       content_image.size, config.iterations_at(index), hooks)
        try:
            result, tile = _run_scale(runtime, config, scale, tiling, shard)
        except NonFiniteLossError as exc:
            if runtime.precision == "fp16":
                exc.args = (f"{exc.args[0]}; with --precision fp16 the activations may have overflowed: "
                            f"try --precision bf16 or fp32",)
            exc.last_iteration += done
            if exc.last_image is not None:  # in the colours the output would have had
                exc.last_image = color.finish(config.preserve_color, exc.last_image, original)
            raise
        tiles_used.append(tile)
        results.append(result)
        done += result.iterations
        previous = result.image  # the next scale continues in the space the transfer runs in
        if result.interrupted:
            break
    final = dataclasses.replace(results[-1], image=color.finish(config.preserve_color, results[-1].image, original))
    graphed = runtime.cuda_graph and all(tile is None for tile in tiles_used)
    return dataclasses.replace(_merge(results[:-1] + [final]), device=str(device), precision=runtime.precision,
                               backend=runtime.backend, cuda_graph=graphed, tile=tiles_used[-1],
                               peak_memory_bytes=peak_bytes(device), weights=runtime.weights_description)


def _load(content, styles: list, config: StyleConfig) -> _Sources:
    """Decode every input and check each scale keeps one feature position at the deepest layer
    (an --init image too, so a bad one fails before the weights load)."""
    layers = feature_layers(config)
    sources = _Sources(load_image(content), [load_image(style) for style in styles], _masks(config, len(styles)))
    if config.init not in INITS:
        load_image(config.init)
    for size in config.scale_sizes():
        content_image, style_images = sources.at(size, config.style_scale, config.resample)
        check_fits(content_image, layers, f"content image at {size} px")
        for image in style_images:
            check_fits(image, layers, f"style image at {size} px")
    return sources


def _inputs(runtime: Runtime, config: StyleConfig, sources: _Sources, content_image: Image.Image,
            style_images: list[Image.Image], previous: torch.Tensor | None) -> Inputs:
    """One scale's tensors on the device, in the space the transfer runs in (colour control)."""
    device = runtime.device
    content = image_to_tensor(content_image).to(device)
    styles = [image_to_tensor(image).to(device) for image in style_images]
    content, styles = color.prepare_inputs(config.preserve_color, content, styles)
    regions, style_regions = _regions_at(sources.masks, content_image, style_images, device)
    start = None if previous is None else _upsampled(previous, content_image.size)
    return Inputs(content=content, styles=styles, start=start, regions=regions, style_regions=style_regions)


def _upsampled(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The previous scale's result resized to (width, height): the next scale's start."""
    width, height = size
    return torch.nn.functional.interpolate(image, size=(height, width), mode="bicubic",
                                           align_corners=False).clamp_(0, 1)


def _merge(results: list[RunResult]) -> RunResult:
    """One result for a multi-scale run: the last image, iterations and losses counted across scales."""
    losses, offset = [], 0
    for result in results:
        losses += [(offset + i, loss) for i, loss in result.losses]
        offset += result.iterations
    return dataclasses.replace(results[-1], iterations=offset, losses=losses,
                               seconds=sum(r.seconds for r in results),
                               skipped_steps=sum(r.skipped_steps for r in results))


@dataclass
class _Tiling:
    """How a render picks each scale's tile: --tile N, auto (the planner's choice), or untiled."""

    option: str | None  # a tile size in px, "auto", or None
    config: StyleConfig
    device: torch.device
    notify: Callable[[str], None]

    @functools.cached_property
    def model(self) -> MemoryModel:
        """The planner's measured model, once per render: it does not depend on the image size."""
        return calibrate(self.config, self.device)

    def first(self, size: tuple[int, int]) -> int | None:
        """The tile size a scale starts with (None: untiled)."""
        if self.option is None:
            return None
        if self.option != "auto":
            return int(self.option)
        width, height = size
        free = free_bytes(self.device)
        if free is None:
            self.notify("--tile auto: free memory unknown on this system; running untiled")
            return None
        tile = auto_tile(self.model, height, width, free)
        self.notify(f"--tile auto at {width}x{height} px: " + ("untiled (the whole image fits)" if tile is None
                                                              else f"{tile} px tiles"))
        return tile

    def after_out_of_memory(self, size: tuple[int, int]) -> int:
        """The planner thought the whole image fits; it did not, so at least halve it."""
        width, height = size
        tile = auto_tile(self.model, height, width, free_bytes(self.device) or 0) or \
            max(ALIGN, max(width, height) // 2 // ALIGN * ALIGN)
        self.notify(f"out of memory untiled at {width}x{height} px; retrying once with --tile {tile}")
        return tile


def _run_scale(runtime: Runtime, config: StyleConfig, scale: _Scale, tiling: _Tiling,
               shard) -> tuple[RunResult, int | None]:
    """Optimise at one scale; an untiled run out of memory falls back to tiles once, saying so."""
    tile = tiling.first(scale.size)
    while True:
        try:
            run = build_run(runtime, config, scale.inputs, tile=tile, shard=shard)
            return run.optimise(scale.iterations, scale.hooks), tile
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
        run = None
        release(runtime.device)  # after the except block, so the failed attempt's tensors can be freed
        width, height = scale.size
        if tile is not None:
            raise RunError(f"out of memory on {runtime.device} at {width}x{height} px with {tile} px tiles; use a "
                           f"smaller --tile, a lower --lbfgs-history, --optimizer adam, or a smaller --size")
        if config.tiling_blocker() is not None:
            raise RunError(f"out of memory on {runtime.device} at {width}x{height} px, and {config.tiling_blocker()} "
                           f"cannot run tiled; use a lower --lbfgs-history, --optimizer adam, or a smaller --size")
        tile = tiling.after_out_of_memory(scale.size)


def _loss_log(path: str | None):
    """A writer appending one JSON line per loss read to ``path`` (checked now, before any work)."""
    if path is None:
        return None
    check_writable(path, ConfigError)
    started = time.perf_counter()

    def write(record: dict) -> None:
        record["seconds"] = round(time.perf_counter() - started, 4)
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    return write


def _masks(config: StyleConfig, n_styles: int):
    """The spatial-control masks as grey images: (content masks, style masks), or None."""
    if not config.content_mask and not config.style_mask:
        return None
    content = [load_image(path).convert("L") for path in config.content_mask] if config.content_mask else None
    style = [load_image(path).convert("L") for path in config.style_mask] if config.style_mask else [None] * n_styles
    return content, style


def _regions_at(masks, content_image: Image.Image, style_images, device):
    """Masks resized to this scale's content and style images, as (1, 1, H, W) tensors in [0, 1]."""
    if masks is None:
        return None, None

    def tensor(mask: Image.Image, like: Image.Image) -> torch.Tensor:
        grey = mask.resize(like.size, Image.Resampling.BILINEAR)
        return image_to_tensor(grey.convert("RGB"))[:, :1].to(device)

    content_masks, style_masks = masks
    regions = [tensor(m, content_image) for m in content_masks] if content_masks else \
        [torch.ones(1, 1, content_image.size[1], content_image.size[0], device=device) for _ in style_images]
    style_regions = [None if m is None else tensor(m, image) for m, image in zip(style_masks, style_images)]
    return regions, style_regions


@_in_api_terms
def stylize(content, styles, config: StyleConfig | None = None, **overrides) -> Image.Image:
    """Stylise ``content`` (path, PIL image or tensor) with one or several ``styles``; a PIL image.

    ``config`` is a StyleConfig (defaults if omitted); keyword overrides change single options,
    e.g. ``stylize("photo.jpg", "starry.jpg", size=256, iterations=200)``.
    """
    return tensor_to_image(render(content, styles, config, **overrides).image)
