"""The Python API: stylise content images with style images, from paths, PIL images or tensors.

``render`` does the work and returns the full ``RunResult`` (the CLI uses it to save, report and
handle interruption); ``stylize`` is the one-call convenience that returns a PIL image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from . import kernels
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
           should_stop: Callable[[], bool] = lambda: False, **overrides) -> RunResult:
    """Stylise ``content`` with ``styles`` (one or several) and return the run's result."""
    config = (config or StyleConfig()).replace(**overrides)
    styles = _as_list(styles)
    if not styles:
        raise ConfigError("at least one style image is needed")
    config.validate(n_styles=len(styles))
    device = resolve_device(config.device)
    backend = kernels.resolve(device, config.backend)  # an unusable --backend fails before any work
    precision = resolve_precision(config.precision, device)

    layers = feature_layers(config)
    content_image = resized(load_image(content), config.size)
    style_size = max(1, round(config.size * config.style_scale))
    style_images = [resized(load_image(style), style_size) for style in styles]
    _check_fits(content_image, layers, "content image")
    for image in style_images:
        _check_fits(image, layers, "style image")

    weights = load_weights(config.weights, seed=RANDOM_WEIGHTS_SEED, progress=not config.quiet)
    graphed = device.type == "cuda" and config.cuda_graph
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes never change within a run
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result = _optimise(content_image, style_images, weights, config, device, precision, graphed,
                           checkpoint, should_stop)
    except torch.cuda.OutOfMemoryError:
        raise RunError(f"out of memory on {device} at --size {config.size}; use a smaller --size "
                       f"or --lbfgs-history, or --optimizer adam") from None
    except NonFiniteLossError as exc:
        if precision == "fp16":
            exc.args = (f"{exc.args[0]}; with --precision fp16 the activations may have overflowed: "
                        f"try --precision bf16 or fp32",)
        raise
    return dataclasses.replace(result, device=str(device), precision=precision, backend=backend,
                               cuda_graph=graphed,
                               peak_memory_bytes=peak_memory_bytes(device))


def _optimise(content_image, style_images, weights, config, device, precision, graphed, checkpoint,
              should_stop) -> RunResult:
    """Build the network and the run on ``device``, then optimise."""
    network = VGGFeatures(feature_layers(config), weights, pooling=config.pooling).to(device)
    content = image_to_tensor(content_image).to(device)
    styles = [image_to_tensor(image).to(device) for image in style_images]
    run = prepare(network, content, styles, config, precision, graphed)
    del content, styles
    result = optimise(run.step, run.image, config.iterations, report_every=config.report_every,
                      progress=not config.quiet, checkpoint=checkpoint,
                      checkpoint_every=config.save_every, should_stop=should_stop)
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
