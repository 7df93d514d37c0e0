"""The Python API: stylise content images with style images, from paths, PIL images or tensors.

``render`` does the work and returns the full ``RunResult`` (the CLI uses it to save, report and
handle interruption); ``stylize`` is the one-call convenience that returns a PIL image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from . import kernels
from .config import RANDOM_WEIGHTS_SEED, StyleConfig
from .devices import resolve_device
from .engine import RunResult, initial_image, make_step, optimise
from .errors import ConfigError, RunError
from .images import image_to_tensor, load_image, resized, tensor_to_image
from .objective import StyleObjective, feature_layers
from .optim import make_optimizer
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
    kernels.resolve(device, config.backend)  # an unusable --backend fails before any work

    layers = feature_layers(config)
    content_image = resized(load_image(content), config.size)
    style_size = max(1, round(config.size * config.style_scale))
    style_images = [resized(load_image(style), style_size) for style in styles]
    _check_fits(content_image, layers, "content image")
    for image in style_images:
        _check_fits(image, layers, "style image")

    weights = load_weights(config.weights, seed=RANDOM_WEIGHTS_SEED, progress=not config.quiet)
    try:
        network = VGGFeatures(layers, weights, pooling=config.pooling).to(device)
        content_t = image_to_tensor(content_image).to(device)
        style_ts = [image_to_tensor(image).to(device) for image in style_images]
        objective = StyleObjective(network, content_t, style_ts, config)
        image = initial_image(config.init, content_t, style_ts[0], config.seed).requires_grad_(True)
        optimizer = make_optimizer(config.optimizer, image, config.step_size, config.lbfgs_history)
        step = make_step(objective, optimizer)
        return optimise(step, image, config.iterations, report_every=config.report_every,
                        progress=not config.quiet, checkpoint=checkpoint,
                        checkpoint_every=config.save_every, should_stop=should_stop)
    except torch.cuda.OutOfMemoryError:
        raise RunError(f"out of memory on {device} at --size {config.size}; use a smaller --size "
                       f"or --lbfgs-history, or --optimizer adam") from None


def stylize(content, styles, config: StyleConfig | None = None, **overrides) -> Image.Image:
    """Stylise ``content`` (path, PIL image or tensor) with one or several ``styles``; a PIL image.

    ``config`` is a StyleConfig (defaults if omitted); keyword overrides change single options,
    e.g. ``stylize("photo.jpg", "starry.jpg", size=256, iterations=200)``.
    """
    return tensor_to_image(render(content, styles, config, **overrides).image)
