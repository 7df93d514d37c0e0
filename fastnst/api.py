"""The Python API: stylise content images with style images, from paths, PIL images or tensors.

``render`` does the work and returns the full ``RunResult`` (the CLI uses it to save, report and
handle interruption); ``stylize`` is the one-call convenience that returns a PIL image.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from . import color, kernels
from .config import RANDOM_WEIGHTS_SEED, StyleConfig
from .devices import resolve_device
from .engine import RunResult, optimise, prepare
from .errors import ConfigError, NonFiniteLossError, RunError
from .images import image_to_tensor, load_image, resized, tensor_to_image
from .objective import feature_layers
from .precision import resolve_precision
from .vgg import VGGFeatures, layer_stride, load_weights


def _as_list(styles) -> list:
    if isinstance(styles, (list, tuple)):
        return list(styles)
    return [styles]


def _check_fits(image: Image.Image, layers: Sequence[str], what: str) -> None:
    """The deepest layer needs at least one feature position: each side >= its pooling stride."""
    need = max(layer_stride(name) for name in layers)
    if min(image.size) < need:
        raise ConfigError(f"the {what} is {image.size[0]}x{image.size[1]} px after resizing; the "
                          f"layers used need at least {need} px on each side (raise --size or "
                          f"--style-scale, or use shallower layers)")


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
    backend = kernels.resolve(device, config.backend)  # an unusable --backend fails before any work
    precision = resolve_precision(config.precision, device)
    if shard is not None and config.tile is None:
        config = config.replace(tile="auto")  # tiles are what processes share

    layers = feature_layers(config)
    content_source = load_image(content)
    style_sources = [load_image(style) for style in styles]
    masks = _masks(config, len(styles))
    log = _loss_log(config.log)
    sizes = config.scale_sizes()
    for size in sizes:  # every scale must keep one feature position at the deepest layer
        _check_fits(resized(content_source, size), layers, f"content image at {size} px")
        for image in style_sources:
            _check_fits(resized(image, max(1, round(size * config.style_scale))), layers,
                        f"style image at {size} px")

    network = build_network(config, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes never change within a scale
        torch.cuda.reset_peak_memory_stats(device)
    results: list[RunResult] = []
    previous, done, tiles_used = None, 0, []
    for index, size in enumerate(sizes):
        content_image = resized(content_source, size)
        style_images = [resized(image, max(1, round(size * config.style_scale))) for image in style_sources]
        start = _upsampled(previous, content_image.size) if previous is not None else None
        label = f"{size} px" + (f" ({index + 1}/{len(sizes)})" if len(sizes) > 1 else "")
        offset, original = done, image_to_tensor(content_image)

        def scale_checkpoint(iteration, image, offset=offset, original=original):
            if checkpoint is not None:
                checkpoint(offset + iteration, color.finish(config.preserve_color, image, original))

        def on_loss(iteration, loss, offset=offset, size=size):
            if log is not None:
                log({"iteration": offset + iteration, "loss": loss, "size": size})

        try:
            result, tile = _run_scale(network, content_image, style_images, config, device, precision,
                                      config.iterations_at(index), start, label, scale_checkpoint,
                                      should_stop, notify, shard, masks, on_loss)
        except NonFiniteLossError as exc:
            if precision == "fp16":
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
    results[-1] = dataclasses.replace(results[-1], image=color.finish(config.preserve_color, results[-1].image,
                                                                      original))
    graphed = device.type == "cuda" and config.cuda_graph and all(t is None for t in tiles_used)
    return dataclasses.replace(_merge(results), device=str(device), precision=precision, backend=backend,
                               cuda_graph=graphed, tile=tiles_used[-1], peak_memory_bytes=peak_memory_bytes(device))


def build_network(config: StyleConfig, device: torch.device) -> VGGFeatures:
    """The VGG19 a configuration needs (its weights, pooling and layers), on ``device``."""
    weights = load_weights(config.weights, seed=RANDOM_WEIGHTS_SEED, progress=not config.quiet)
    return VGGFeatures(feature_layers(config), weights, pooling=config.pooling).to(device)


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
    last = results[-1]
    return dataclasses.replace(last, iterations=offset, losses=losses,
                               seconds=sum(r.seconds for r in results),
                               skipped_steps=sum(r.skipped_steps for r in results))


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _run_scale(network, content_image, style_images, config, device, precision, iterations, start, label,
               checkpoint, should_stop, notify, shard, masks, on_loss) -> tuple[RunResult, int | None]:
    """Optimise at one scale; an untiled run out of memory falls back to tiles once, saying so."""
    tile = _tile_for(config, content_image, device, notify)
    width, height = content_image.size
    while True:
        try:
            result = _optimise(network, content_image, style_images, config, device, precision, tile,
                               iterations, start, label, checkpoint, should_stop, shard, masks, on_loss)
            return result, tile
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc):
                raise
        _release(device)  # after the except block, so the failed attempt's tensors can be freed
        if tile is not None:
            raise RunError(f"out of memory on {device} at {width}x{height} px with {tile} px tiles; use a "
                           f"smaller --tile, a lower --lbfgs-history, --optimizer adam, or a smaller --size")
        from .plan import auto_tile, calibrate, free_bytes
        from .tiling import ALIGN

        # The planner thought the whole image fits; it did not, so at least halve it.
        tile = auto_tile(calibrate(config, device), height, width, free_bytes(device) or 0) or \
            max(ALIGN, max(width, height) // 2 // ALIGN * ALIGN)
        notify(f"out of memory untiled at {width}x{height} px; retrying once with --tile {tile}")


def _loss_log(path: str | None):
    """A writer appending one JSON line per loss read to ``path`` (checked now, before any work)."""
    if path is None:
        return None
    import json
    import time

    from .files import check_writable

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


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tile_for(config: StyleConfig, content_image: Image.Image, device: torch.device, notify) -> int | None:
    """The tile size of this scale: --tile N, or what --tile auto's planner picks (None: untiled)."""
    if config.tile is None:
        return None
    width, height = content_image.size
    if config.tile != "auto":
        return int(config.tile)
    from .plan import auto_tile, calibrate, free_bytes

    free = free_bytes(device)
    if free is None:
        notify("--tile auto: free memory unknown on this system; running untiled")
        return None
    tile = auto_tile(calibrate(config, device), height, width, free)
    notify(f"--tile auto at {width}x{height} px: " + ("untiled (the whole image fits)" if tile is None
                                                     else f"{tile} px tiles"))
    return tile


def _optimise(network, content_image, style_images, config, device, precision, tile, iterations, start,
              label, checkpoint, should_stop, shard, masks=None, on_loss=None) -> RunResult:
    """Build the run at one scale on ``device``, then optimise."""
    content = image_to_tensor(content_image).to(device)
    styles = [image_to_tensor(image).to(device) for image in style_images]
    content, styles = color.prepare_inputs(config.preserve_color, content, styles)
    regions, style_regions = _regions_at(masks, content_image, style_images, device)
    graphed = device.type == "cuda" and config.cuda_graph and tile is None
    run = prepare(network, content, styles, config, precision, graphed, tile=tile, start=start, shard=shard,
                  regions=regions, style_regions=style_regions)
    del content, styles
    result = optimise(run.step, run.image, iterations, report_every=config.report_every,
                      progress=not config.quiet, checkpoint=checkpoint, checkpoint_every=config.save_every,
                      should_stop=should_stop, label=label, on_loss=on_loss)
    if run.scaler is not None:
        result.skipped_steps = int(run.scaler.skipped.item())
    return result


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of the run: allocated CUDA memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def stylize(content, styles, config: StyleConfig | None = None, **overrides) -> Image.Image:
    """Stylise ``content`` (path, PIL image or tensor) with one or several ``styles``; a PIL image.

    ``config`` is a StyleConfig (defaults if omitted); keyword overrides change single options,
    e.g. ``stylize("photo.jpg", "starry.jpg", size=256, iterations=200)``.
    """
    return tensor_to_image(render(content, styles, config, **overrides).image)
