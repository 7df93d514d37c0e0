"""Every default in one place.

``StyleConfig`` holds the options of one stylisation.  Each field carries its help text and valid
range as metadata; ``cli.py`` builds its flags from these fields and ``validate()`` checks the
ranges, so the defaults, the ``--help`` text and the checks cannot drift apart.

Loss weights follow the paper's formulas (DESIGN.md):

    L = content_weight * sum_c v_c * L_c  +  style_weight * sum_l w_l * E_l  +  tv_weight * TV

with L_c = 1/2 sum (F - P)^2 and E_l = sum (G - A)^2 / (4 N_l^2 M_l^2).  The defaults reproduce the
official PyTorch neural-style tutorial's objective exactly (style weight 1e6, content weight 1,
losses as mean squared errors of features and of Grams divided by N*M); its normalisations fold
into the per-layer weights: v_c = 2 / (N_c M_c) and w_l = 4 / N_l^2 (see docs/objective.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError

OPTIMIZERS = ("lbfgs", "adam")
WEIGHTS_FORMATS = ("auto", "torchvision", "caffe", "caffe-normalised")  # vgg.FORMATS and auto
STYLE_LOSSES = ("gram", "meancov")
LBFGS_STEPS = ("bounded", "torch")  # optim.STEP_RULES (config imports nothing heavy)
POOLINGS = ("max", "avg")
INITS = ("noise", "content", "style")  # or an image file
BACKENDS = ("auto", "torch", "triton")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# alpha and beta used when --content-weight / --style-weight are not given, by style loss and weights
# format, so that each format gives sensible results without retuning.  Gram loss: each format's
# network has its own activation scale, and the Gram loss grows with its 4th power, the content
# loss with its square.  With the default per-layer weights (v_c = 2/(N M), w_l = 4/N^2, see below):
#   torchvision:      the PyTorch tutorial's objective (alpha 1, beta 1e6);
#   caffe:            neural-style's defaults (content weight 5, style weight 100: its losses are
#                     these same mean squared errors of features and of Grams / (N M));
#   caffe-normalised: Gatys et al.'s own PyTorch notebook (content mse weight 1, style weights
#                     1e3 / N^2 on mse(G/M, A/M) = 4 E_l, i.e. beta w_l = 4e3 / N^2).
# Mean-covariance loss: both terms grow with the square of the activations, so one ratio serves
# every format: style-transfer-pytorch's content weight 0.015 with style weights summing to one.
DEFAULT_LOSS_WEIGHTS = {
    ("gram", "torchvision"): (1.0, 1e6),
    ("gram", "caffe"): (5.0, 100.0),
    ("gram", "caffe-normalised"): (1.0, 1e3),
    ("meancov", "torchvision"): (0.015, 1.0),
    ("meancov", "caffe"): (0.015, 1.0),
    ("meancov", "caffe-normalised"): (0.015, 1.0),
}


def default_loss_weights(style_loss: str, weights_format: str) -> tuple[float, float]:
    """(alpha, beta) when --content-weight / --style-weight are not given."""
    return DEFAULT_LOSS_WEIGHTS[(style_loss, weights_format)]


# Video's temporal weight gamma (Ruder, Dosovitskiy & Brox, GCPR 2016), on the term
# sum(mask * (x - target)^2) / D.  Their artistic-videos runs neural-style's losses, i.e. this
# project's caffe format, with alpha 5, beta 100 and gamma 1e3 on 0-255 images; on [0, 1] images
# that gamma is 1e3 * 255^2.  Other formats are carried over as the loss weights above are: if a
# format's activations are k times the caffe network's, content grows with k^2 and the Gram loss
# with k^4, and each format's default (alpha, beta) strike the same balance, which gives
# k^2 = (alpha_caffe beta) / (beta_caffe alpha), and keeping gamma's ratio to the content term,
# gamma = gamma_caffe (alpha / alpha_caffe)^2 (beta_caffe / beta): 260 for torchvision, 2.6e5 for
# caffe-normalised.  The mean-covariance loss grows with k^2 like the content term, so it keeps
# the Gram default's ratio to the content weight.  Only the caffe value is the paper's own; the
# others rest on the peers' weights sharing neural-style's balance.
RUDER_TEMPORAL_WEIGHT = 1e3 * 255.0**2


def default_temporal_weight(style_loss: str, weights_format: str) -> float:
    """gamma when --temporal-weight is not given (see RUDER_TEMPORAL_WEIGHT)."""
    caffe_alpha, caffe_beta = DEFAULT_LOSS_WEIGHTS[("gram", "caffe")]
    alpha, beta = DEFAULT_LOSS_WEIGHTS[("gram", weights_format)]
    gamma = RUDER_TEMPORAL_WEIGHT * (alpha / caffe_alpha) ** 2 * (caffe_beta / beta)
    if style_loss == "gram":
        return gamma
    return gamma * DEFAULT_LOSS_WEIGHTS[(style_loss, weights_format)][0] / alpha


# Step size used when --lr is not given.  L-BFGS: the unit step of a quasi-Newton method
# (torch.optim.LBFGS and neural-style use 1).  Adam: the per-step pixel change in [0, 1] units;
# 0.02 ~ 5/255, between neural-style's 10/255 and the slower but steadier values peers use.
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.02}

# Presets: option values a preset sets wherever the caller left an option at its default.
PRESETS = {
    # Gatys, Ecker & Bethge, CVPR 2016: content conv4_2; style conv1_1 .. conv5_1 with w_l = 1/5;
    # average pooling ("improves the gradient flow ... slightly more appealing results", sec. 2);
    # white-noise initialisation; L-BFGS; alpha / beta = 1e-3 (Fig. 2 and sec. 3); v_c = 1.  The
    # paper's network is the normalised VGG19: with --weights vgg_conv.pth (recognised as
    # caffe-normalised) this is the paper's setting; with other weights the run says so.
    "gatys2016": {
        "content_layers": ("conv4_2",),
        "style_layers": ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"),
        "content_layer_weights": (1.0,),
        "style_layer_weights": (0.2, 0.2, 0.2, 0.2, 0.2),
        "pooling": "avg",
        "init": "noise",
        "optimizer": "lbfgs",
        "content_weight": 1e-3,
        "style_weight": 1.0,
    },
    # style-transfer-pytorch's defaults (Crowson): Adam (step 0.02) on an image started from the
    # content, multi-scale from 128 px up by sqrt(2), 500 iterations per scale, the output the
    # average of the iterates (decay 0.99), the mean-covariance (Wasserstein-2) style loss with
    # layer weights 256:64:16:4:1 summing to one, content weight 0.015 on the mean squared error.
    # Not reproduced: its total-variation term (a 9-point stencil on means; fastnst's TV is a sum),
    # Adam's beta2 (0.99; fastnst's is 0.999), 1000 iterations at the first scale, replicate padding.
    "meancov-adam": {
        "style_loss": "meancov",
        "optimizer": "adam",
        "lr": 0.02,
        "average_decay": 0.99,
        "init": "content",
        "start_size": 128,
        "iterations": 500,
        "content_weight": 0.015,
        "style_weight": 1.0,
        "style_layer_weights": tuple(w / 341 for w in (256.0, 64.0, 16.0, 4.0, 1.0)),
    },
    # Quality per second: start from the content (the structure is there from step one), fewer
    # iterations, a shorter L-BFGS history (less memory traffic per step).  Chosen by reasoning and
    # the CPU step timings, not yet by looking at pretrained-weight results.
    "fast": {
        "init": "content",
        "iterations": 200,
        "lbfgs_history": 10,
    },
}

# Random VGG weights (--weights random) are always drawn with this seed, so that --seed only
# changes the initial image and benchmark runs stay comparable.
RANDOM_WEIGHTS_SEED = 0

T = TypeVar("T")


def preset_values(name: str | None, chosen: set[str]) -> dict[str, Any]:
    """The values preset ``name`` sets, except the options in ``chosen`` (given explicitly): the one
    mechanism by which presets apply, whether a config is made or replaced."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, not '{name}'")
    return {option: value for option, value in PRESETS[name].items() if option not in chosen}


def option(default: Any, help: str, *, metavar: str | None = None, choices: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None, above: float | None = None,
           many: bool = False, required: bool = False) -> Any:
    """A config field with what the CLI and the validator need to know about it.

    minimum/maximum are inclusive bounds, ``above`` an exclusive lower bound; ``many`` marks a
    tuple option given as several values after one flag; ``required``, a flag the command needs.
    The help of a switch that is on by default describes its --no- flag, which is what --help
    lists.
    """
    meta = dict(help=help, metavar=metavar, choices=choices, minimum=minimum, maximum=maximum,
                above=above, many=many, required=required)
    return field(default=default, metadata=meta)


@dataclass
class _Preset:
    """The preset option (first in the combined config, and in --help)."""

    preset: str | None = option(None, "a set of options, applied wherever an option is left at its default: "
                                "gatys2016 = the paper exactly (conv4_2; conv1_1..conv5_1, w_l = 1/5; avg "
                                "pooling; noise init; L-BFGS; alpha/beta = 1e-3; its network is --weights "
                                "vgg_conv.pth); meancov-adam = style-transfer-pytorch's defaults (Adam 0.02 from "
                                "the content, multi-scale from 128 px, iterate average 0.99, mean-covariance "
                                "style loss, layer weights 256:64:16:4:1, content weight 0.015); fast = content "
                                "init, 200 iterations, L-BFGS history 10", choices=tuple(PRESETS))


RESAMPLE_FILTERS = ("lanczos", "bilinear")


@dataclass
class ScheduleOptions:
    """How the image is optimised: sizes and scales, iterations, optimiser, start."""

    size: int = option(512, "longest side of the output image in pixels", metavar="PX",
                       minimum=16, maximum=65536)
    iterations: int = option(500, "optimisation steps (each one VGG forward and backward)", metavar="N",
                             minimum=1, maximum=10_000_000)
    optimizer: str = option("lbfgs", "optimiser: L-BFGS (the paper's) or Adam", choices=OPTIMIZERS)
    lr: float | None = option(None, "step size (default: 1.0 for lbfgs, 0.02 for adam)", metavar="LR",
                              above=0.0, maximum=1e6)
    lbfgs_history: int = option(20, "L-BFGS history length m: pairs kept, each costs 2 image-sized "
                                "fp32 vectors", metavar="M", minimum=1, maximum=1000)
    lbfgs_steps: str = option("bounded", "L-BFGS step rule: bounded (first step moves the largest pixel by lr/16, "
                              "no step moves a pixel by more than lr/4, noise-like curvature pairs skipped: "
                              "works at any loss scale) or torch (torch.optim.LBFGS without line search, "
                              "exactly)", choices=LBFGS_STEPS)
    init: str = option("noise", "initial image: seeded noise, the content or the style image, or an "
                       "image file (resized to the output)", metavar="noise|content|style|PATH")
    average_decay: float = option(0.0, "output the exponential moving average of the iterates with this "
                                  "decay (bias-corrected; 0 = off, 0.99 smooths over ~100 iterations)",
                                  metavar="D", minimum=0.0, maximum=0.9999)
    seed: int = option(0, "random seed of the noise initialisation", metavar="N",
                       minimum=0, maximum=2**63 - 1)
    scales: tuple[int, ...] | None = option(None, "multi-scale: optimise at these sizes in turn, each result "
                                            "upsampled to start the next; the last is the output size "
                                            "(replaces --size)", metavar="PX", minimum=16, maximum=65536,
                                            many=True)
    start_size: int | None = option(None, "multi-scale from this size up to --size in steps of sqrt(2) (one "
                                    "scale when it is not below --size)",
                                    metavar="PX", minimum=16, maximum=65536)
    scale_iterations: tuple[int, ...] | None = option(None, "iterations at each scale, one value per scale "
                                                      "(default: --iterations at every scale)", metavar="N",
                                                      minimum=1, maximum=10_000_000, many=True)

    @property
    def step_size(self) -> float:
        """The step size in use: --lr, or the optimiser's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def scale_sizes(self) -> tuple[int, ...]:
        """The sizes optimised in turn: --scales, or --start-size up to --size by sqrt(2), or --size."""
        if self.scales:
            return tuple(self.scales)
        if self.start_size:
            sizes, size = [], float(self.start_size)
            while round(size) < self.size:
                sizes.append(round(size))
                size *= math.sqrt(2)
            return (*sizes, self.size)
        return (self.size,)

    def iterations_at(self, index: int) -> int:
        return self.scale_iterations[index] if self.scale_iterations else self.iterations


@dataclass
class ObjectiveOptions:
    """What the objective is: the network's weights and layers, the loss weights, style and colour control."""

    weights: str = option("imagenet", "VGG19 weights: imagenet (torchvision, cached), random "
                          "(seeded, for tests and benchmarks) or a state-dict file", metavar="imagenet|random|PATH")
    weights_format: str = option("auto", "what the weights expect: torchvision (RGB, ImageNet mean/std), caffe "
                                 "(the original VGG19 converted for neural-style: BGR, 0-255, mean pixel "
                                 "subtracted) or caffe-normalised (Gatys et al.'s vgg_conv.pth); auto recognises "
                                 "the key layout and the published file names", choices=WEIGHTS_FORMATS)
    style_loss: str = option("gram", "style statistics matched per layer: gram (Gatys et al.) or meancov "
                             "(feature means and covariances, the Wasserstein-2 distance between Gaussians)",
                             choices=STYLE_LOSSES)
    normalize_gradients: bool = option(False, "scale each loss term's gradient at its layer by the inverse of "
                                       "its L1 norm (neural-style's -normalize_gradients)")
    pooling: str = option("max", "VGG pooling (the paper prefers avg; max suits torchvision's weights)",
                          choices=POOLINGS)
    content_weight: float | None = option(None, "alpha, the content loss weight (default: 1 for torchvision "
                                          "weights, 5 for caffe, 1 for caffe-normalised; 0.015 with "
                                          "--style-loss meancov)", metavar="ALPHA", minimum=0.0, maximum=1e30)
    style_weight: float | None = option(None, "beta, the style loss weight (default: 1e6 for torchvision "
                                        "weights, 100 for caffe, 1e3 for caffe-normalised; 1 with "
                                        "--style-loss meancov)", metavar="BETA", minimum=0.0, maximum=1e30)
    tv_weight: float = option(0.0, "total-variation weight (smoothness; 0 = off)", metavar="W",
                              minimum=0.0, maximum=1e30)
    content_layers: tuple[str, ...] = option(("conv4_2",), "VGG19 layers whose features carry the content",
                                             metavar="LAYER", many=True)
    style_layers: tuple[str, ...] = option(("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"),
                                           "VGG19 layers whose Gram matrices carry the style",
                                           metavar="LAYER", many=True)
    content_layer_weights: tuple[float, ...] | None = option(
        None, "per-content-layer weights v_c (default: 2/(N*M), the tutorial's mean squared error)",
        metavar="V", minimum=0.0, maximum=1e30, many=True)
    style_layer_weights: tuple[float, ...] | None = option(
        None, "per-style-layer weights w_l (default: 4/N^2, the tutorial's Gram normalisation; "
        "1/L with --style-loss meancov)",
        metavar="W", minimum=0.0, maximum=1e30, many=True)
    style_blend_weights: tuple[float, ...] | None = option(
        None, "relative weight of each style image (default: equal); targets are the weighted "
        "mean of their Grams", metavar="B", minimum=0.0, maximum=1e30, many=True)
    style_scale: float = option(1.0, "style image size relative to the output size", metavar="S",
                                above=0.0, maximum=16.0)
    resample: str = option("lanczos", "filter that scales the content and style images to their sizes: lanczos "
                           "(sharp) or bilinear (what neural-style-pt uses: for comparisons with it)",
                           choices=RESAMPLE_FILTERS)
    preserve_color: str = option("none", "colour control: luminance (transfer on luminance only, the content's "
                                 "colours kept exactly), histogram (style colours matched to the content's "
                                 "mean and covariance first) or none", choices=("none", "luminance", "histogram"))
    content_mask: tuple[str, ...] | None = option(
        None, "spatial control: one mask image per style (white = this style here); each style then "
              "acts only in its region instead of being blended", metavar="MASK", many=True)
    style_mask: tuple[str, ...] | None = option(
        None, "one mask per style image choosing the part of it to take the style from (white = use)",
        metavar="MASK", many=True)


@dataclass
class RuntimeOptions:
    """Where and how it runs: device, precision, kernels, CUDA graphs, tiling."""

    device: str = option("auto", "where to run: auto (CUDA if present), cpu, cuda or cuda:N", metavar="DEVICE")
    precision: str = option("auto", "network precision: auto (bf16 where the hardware computes it natively: GPUs "
                            "with bf16, CPUs with AMX or AVX-512 BF16; fp32 elsewhere), "
                            "fp32, bf16 or fp16 (with loss scaling); the image and optimiser stay fp32",
                            choices=PRECISIONS)
    backend: str | None = option(None, "kernel backend: auto (Triton on CUDA, PyTorch elsewhere), torch "
                                 "or triton (default: $FASTNST_BACKEND, else auto)", choices=BACKENDS)
    cuda_graph: bool = option(True, "run each iteration eagerly, op by op, instead of replaying it as one "
                              "captured CUDA graph (the default on CUDA)")
    tile: str | None = option(None, "evaluate the objective tile by tile with exact results: interior size "
                              "in px (a multiple of 16) or auto (the largest tile that fits free memory; "
                              "untiled if the whole image fits)", metavar="SIZE|auto")
    tile_halo: int | None = option(None, "pixels of context around each tile (default: the exact one for the "
                                   "deepest layer, 80 px for conv5_1); less is faster but approximate",
                                   metavar="PX", minimum=0, maximum=4096)


@dataclass
class OutputOptions:
    """What is written and reported: checkpoints, loss reads and log, 16-bit output, messages."""

    save_every: int = option(0, "also save the image every N iterations as OUT_<iteration>.<ext> "
                             "(0 = off)", metavar="N", minimum=0, maximum=10_000_000)
    report_every: int = option(10, "on CUDA, read the loss back every N iterations (each read "
                               "waits for the GPU); on CPU it is read every iteration", metavar="N",
                               minimum=1, maximum=10_000_000)
    output_16bit: bool = option(False, "write 16 bits per channel (.png or .tif/.tiff outputs only)")
    log: str | None = option(None, "append the loss as JSON lines ({\"iteration\", \"loss\", \"size\", \"seconds\"}) "
                             "to this file, for plotting (on CUDA, every --report-every iterations)", metavar="PATH")
    quiet: bool = option(False, "no progress bar or summary")
    verbose: bool = option(False, "also report precision, backend, CUDA graph, skipped fp16 steps "
                           "and peak memory at the end")


@dataclass
class StyleConfig(OutputOptions, RuntimeOptions, ObjectiveOptions, ScheduleOptions, _Preset):
    """Options of one stylisation; every default of the library and the CLI lives here.

    The fields are declared by concern in the classes it combines (schedule, objective, runtime,
    output), so each part of the engine can take the concern it needs; ``part`` copies one out.
    """

    def __post_init__(self) -> None:
        if isinstance(self.tile, int) and not isinstance(self.tile, bool):
            self.tile = str(self.tile)
        if self.preset in PRESETS:  # StyleConfig(preset=...): the preset fills options left at default
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            chosen = {name for name in PRESETS[self.preset] if getattr(self, name) != defaults[name]}
            for name, value in preset_values(self.preset, chosen).items():
                setattr(self, name, value)
        # Accept lists (Python callers, JSON) for tuple options and Path objects for weights.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("many") and isinstance(value, (list, tuple)):
                setattr(self, f.name, tuple(value))
            elif f.metadata.get("many") and isinstance(value, (str, int, float)):
                setattr(self, f.name, (value,))
        if not isinstance(self.weights, str):
            self.weights = str(self.weights)

    def replace(self, **overrides: Any) -> "StyleConfig":
        """A copy with some options changed; unknown names are a ConfigError.

        A ``preset`` among the overrides is applied first, and the other overrides win over it:
        ``config.replace(preset="gatys2016", pooling="max")`` is the paper with max pooling.
        """
        names = {f.name for f in dataclasses.fields(self)}
        for name in overrides:
            if name not in names:
                raise ConfigError(f"unknown option '{name}'")
        preset = overrides.pop("preset", self.preset)
        values = preset_values(preset, set(overrides)) if preset != self.preset else {}
        # preset=None while copying: __post_init__ must not re-apply it over the values set here.
        copy = dataclasses.replace(self, preset=None, **{**values, **overrides})
        copy.preset = preset
        return copy

    def part(self, concern: type[T]) -> T:
        """The options of one concern: ScheduleOptions, ObjectiveOptions, RuntimeOptions or OutputOptions."""
        return concern(**{f.name: getattr(self, f.name) for f in dataclasses.fields(concern)})

    def tiling_blocker(self) -> str | None:
        """The option that keeps this run from being evaluated tile by tile, if any."""
        if self.style_loss != "gram":
            return f"--style-loss {self.style_loss}"
        if self.normalize_gradients:
            return "--normalize-gradients"
        if self.content_mask or self.style_mask:
            return "--content-mask/--style-mask"
        return None

    def validate(self, n_styles: int | None = None) -> "StyleConfig":
        """Check every option before any work starts; raises ConfigError naming the valid range."""
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        from .vgg import LAYERS  # late import: vgg pulls in torchvision

        for kind, layers in (("content", self.content_layers), ("style", self.style_layers)):
            if not layers:
                raise ConfigError(f"at least one {kind} layer is needed")
            for name in layers:
                if name not in LAYERS:
                    raise ConfigError(f"unknown {kind} layer '{name}' (valid: conv1_1 .. conv5_4, "
                                      f"relu1_1 .. relu5_4)")
        _check_count("--content-layer-weights", self.content_layer_weights, len(self.content_layers),
                     "content layers")
        _check_count("--style-layer-weights", self.style_layer_weights, len(self.style_layers),
                     "style layers")
        if n_styles is not None:
            _check_count("--style-blend-weights", self.style_blend_weights, n_styles, "style images")
        if self.style_blend_weights is not None and sum(self.style_blend_weights) <= 0:
            raise ConfigError("--style-blend-weights must not all be 0")
        if self.device not in ("auto", "cpu", "cuda") and not _is_cuda_index(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, not '{self.device}'")
        if not self.weights:
            raise ConfigError("--weights must be imagenet, random or a file path")
        if self.tile is not None and self.tile != "auto":
            if not self.tile.isdigit() or int(self.tile) < 16 or int(self.tile) % 16:
                raise ConfigError(f"--tile must be auto or a multiple of 16 px (16, 32, ...), not '{self.tile}'")
        if n_styles is not None:
            _check_count("--content-mask", self.content_mask, n_styles, "style images")
            _check_count("--style-mask", self.style_mask, n_styles, "style images")
        if (self.content_mask or self.style_mask) and self.tile is not None:
            raise ConfigError("--content-mask/--style-mask cannot be combined with --tile yet")
        if (self.content_mask or self.style_mask) and self.style_loss != "gram":
            raise ConfigError("--content-mask/--style-mask need --style-loss gram")
        if self.tile is not None and self.tiling_blocker() is not None:
            raise ConfigError(f"{self.tiling_blocker()} cannot be combined with --tile yet (it needs the whole "
                              f"image's statistics in one pass)")
        if not self.init:
            raise ConfigError("--init must be noise, content, style or an image file")
        if self.tile_halo is not None and self.tile_halo % 16:
            raise ConfigError(f"--tile-halo must be a multiple of 16 px, not {self.tile_halo}")
        if self.scales is not None and self.start_size is not None:
            raise ConfigError("give --scales or --start-size, not both")
        if self.scales is not None and list(self.scales) != sorted(set(self.scales)):
            raise ConfigError("--scales must increase, e.g. 512 1024 2048")
        if self.scale_iterations is not None and len(self.scale_iterations) != len(self.scale_sizes()):
            raise ConfigError(f"--scale-iterations needs one value per scale ({len(self.scale_sizes())}), "
                              f"got {len(self.scale_iterations)}")
        return self



# The stylize options each other command takes: every StyleConfig option but those that do
# not act there (its --help does not list them, its parser refuses them, and a --jobs line that
# sets one is refused).  batch renders every job at one size, untiled, without masks (each job
# would need its own), checkpoints or a loss log; video renders each frame at one size, without
# masks, checkpoints, a loss log or 16-bit frames; plan predicts a run, so what only decides
# what is written or said (output, checkpoints, log, messages) has nothing to act on.
MULTI_SCALE = ("scales", "start_size", "scale_iterations")
NOT_IN_COMMAND = {
    "batch": (*MULTI_SCALE, "tile", "tile_halo", "content_mask", "style_mask", "save_every", "log", "verbose"),
    "video": (*MULTI_SCALE, "content_mask", "style_mask", "save_every", "log", "output_16bit"),
    "plan": ("save_every", "log", "output_16bit", "quiet", "verbose"),
}


def single_scale(config: StyleConfig) -> tuple[StyleConfig, str | None]:
    """``config`` without a multi-scale schedule (batch and video render at --size; a preset such
    as meancov-adam brings one), and a note saying what was dropped (None: nothing)."""
    dropped = {name: getattr(config, name) for name in MULTI_SCALE if getattr(config, name) is not None}
    if not dropped:
        return config, None
    shown = ", ".join(f"{flag_name(k)} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
                      for k, v in dropped.items())
    single = dataclasses.replace(config, preset=None, **dict.fromkeys(dropped))
    single.preset = config.preset
    return single, f"each image is rendered at --size {config.size}; the multi-scale schedule ({shown}) is not used"


def _is_cuda_index(spec: str) -> bool:
    prefix, _, index = spec.partition(":")
    return prefix == "cuda" and index.isdigit()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# A flag in a message, and whether a metavar follows it (--weights PATH|random, --out DIR).
_FLAG_IN_TEXT = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?P<value> (?=[A-Z]{2,}|[A-Za-z0-9_.]+\|))?"
                           r"(?P<choice> [a-z][a-z0-9-]*\b)?")


def in_api_terms(message: str) -> str:
    """``message`` as the Python API says it: each option flag becomes the argument it stands for
    (``--style-weight`` -> ``style_weight``, ``--no-cuda-graph`` -> ``cuda_graph=False``, ``--weights
    PATH|random`` -> ``weights=PATH|random``, ``--optimizer adam`` -> ``optimizer='adam'``); other
    text, and flags that are no option, stay."""
    fields = {f.name: f for config in (StyleConfig, BatchConfig, VideoConfig, BenchConfig)
              for f in dataclasses.fields(config)}

    def argument(match: re.Match) -> str:
        name = match.group(1).replace("-", "_")
        if name.startswith("no_") and name[3:] in fields and fields[name[3:]].default is True:
            return f"{name[3:]}=False" + (match.group("value") or "") + (match.group("choice") or "")
        if name not in fields:
            return match.group(0)
        choice = (match.group("choice") or "").strip()
        if choice and choice in (fields[name].metadata.get("choices") or ()):
            return f"{name}='{choice}'"
        return (f"{name}=" if match.group("value") else name) + (match.group("choice") or "")

    return _FLAG_IN_TEXT.sub(argument, message)


def _check_count(flag: str, values: tuple | None, expected: int, what: str) -> None:
    if values is not None and len(values) != expected:
        raise ConfigError(f"{flag} needs one value per {what[:-1]} ({expected}), got {len(values)}")


def _check_field(f: dataclasses.Field, value: Any) -> None:
    meta, flag = f.metadata, flag_name(f.name)
    if meta.get("choices") and value is not None and value not in meta["choices"]:
        raise ConfigError(f"{flag} must be one of {', '.join(meta['choices'])}, not '{value}'")
    values = value if meta.get("many") and value is not None else (value,)
    for item in values:
        if item is None or isinstance(item, str) or f.type in ("bool",):
            continue
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(f"{flag} must be a number, not {item!r}")
        if f.type == "int" and not float(item).is_integer():
            raise ConfigError(f"{flag} must be a whole number, not {item!r}")
        if not math.isfinite(item):
            raise ConfigError(f"{flag} must be finite, not {item!r}")
        low, high, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
        if (low is not None and item < low) or (above is not None and item <= above) or (
                high is not None and item > high):
            raise ConfigError(f"{flag} must be {_range_text(low, above, high)}, not {item!r}")


def _range_text(low: float | None, above: float | None, high: float | None) -> str:
    def show(v: float) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if above is not None:
        return f"> {show(above)} and <= {show(high)}" if high is not None else f"> {show(above)}"
    if high is not None:
        return f"in [{show(low)}, {show(high)}]"
    return f">= {show(low)}"


BENCH_MODES = ("fast", "fp32", "eager", "torch", "plain", "reference")
ABLATIONS = ("fp32", "eager", "torch")  # the fast path with one speed feature off


@dataclass
class BenchConfig:
    """Options of ``fastnst bench``; like StyleConfig, the CLI flags are built from these fields."""

    sizes: tuple[int, ...] | None = option(None, "square image sizes in pixels (default: 256 512 1024 on "
                                           "CUDA, 128 256 on CPU)", metavar="PX", minimum=16, maximum=65536,
                                           many=True)
    optimizers: tuple[str, ...] = option(("lbfgs", "adam"), "optimisers to time", metavar="NAME", many=True)
    iterations: int = option(10, "timed iterations per repeat", metavar="N", minimum=1, maximum=100_000)
    repeats: int = option(3, "timed repeats; the median is reported, min and max as the spread",
                          metavar="N", minimum=1, maximum=1000)
    warmup: int = option(2, "untimed iterations before timing (compilation, cuDNN autotuning)",
                         metavar="N", minimum=0, maximum=1000)
    ablate: bool = option(False, "also time the fast path with each speed feature switched off in turn "
                          "(fp32 instead of bf16, eager instead of CUDA graph, torch kernels instead of "
                          "Triton)")
    reference: bool = option(True, "do not time the textbook reference (fastnst/reference_gatys.py), "
                             "which is timed by default")
    modes: tuple[str, ...] | None = option(
        None, "exactly these modes, in this order, instead of fast [+ --ablate] [+ reference]: fast; fp32, "
        "eager, torch (the fast path with one speed feature off); plain (all three off: fp32, eager, PyTorch "
        "kernels); reference (the textbook)", metavar="MODE", many=True)
    device: str = option("auto", "where to run: auto, cpu, cuda or cuda:N", metavar="DEVICE")
    max_size: bool = option(False, "instead of timing, find the largest square image that fits, for the "
                            "fast path and the reference (CUDA only; bisection with real allocations)")
    json: str | None = option(None, "write all results with device, versions, date and commit here",
                              metavar="PATH")
    plot: str | None = option(None, "draw s/iter against megapixels (log scale) to this image; needs "
                              "matplotlib (pip install 'fastnst[plot]')", metavar="PATH")
    report: str | None = option(None, "print the README's benchmark table (markdown) from the fastnst "
                                "bench JSON files in this folder, and exit", metavar="DIR")
    quiet: bool = option(False, "no progress lines, only the table")

    def __post_init__(self) -> None:
        for name in ("sizes", "optimizers", "modes"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    def timed_modes(self) -> tuple[str, ...]:
        """The modes to time, in order: --modes, else fast, the ablations if asked, the reference."""
        if self.modes is not None:
            return tuple(dict.fromkeys(self.modes))
        return ("fast", *(ABLATIONS if self.ablate else ()), *(("reference",) if self.reference else ()))

    def validate(self) -> "BenchConfig":
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        for name in self.optimizers:
            if name not in OPTIMIZERS:
                raise ConfigError(f"--optimizers must be among {', '.join(OPTIMIZERS)}, not '{name}'")
        for name in self.modes or ():
            if name not in BENCH_MODES:
                raise ConfigError(f"--modes must be among {', '.join(BENCH_MODES)}, not '{name}'")
        if self.modes is not None and self.ablate:
            raise ConfigError("give --modes or --ablate, not both (--modes fast fp32 eager torch is --ablate)")
        if self.device not in ("auto", "cpu", "cuda") and not _is_cuda_index(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, not '{self.device}'")
        return self


@dataclass
class VideoConfig:
    """Options of ``fastnst video`` beyond the stylisation options (StyleConfig)."""

    temporal_weight: float | None = option(None, "weight of the temporal term holding each frame to the "
                                           "previous stylised frames warped along the optical flow (0 = "
                                           "independent frames; default: Ruder et al.'s, 6.5e7 for caffe "
                                           "weights, 260 for torchvision, 2.6e5 for caffe-normalised; times "
                                           "0.015 / the Gram content weight with --style-loss meancov)",
                                           metavar="W", minimum=0.0, maximum=1e30)
    temporal_frames: tuple[int, ...] = option((1,), "earlier frames each frame is held to, as offsets (1 = the "
                                              "previous frame; e.g. 1,2,4 adds long-term targets)", metavar="J",
                                              minimum=1, maximum=100, many=True)
    fps: float | None = option(None, "frames per second: a video file is resampled in time to this rate (a "
                               "frame every 1/FPS s, each the input frame shown then: fewer or more frames, the "
                               "same duration and audio sync); a folder's frames are shown at this rate "
                               "(default: every input frame at its own time; 25 for a folder)", metavar="FPS",
                               above=0.0, maximum=1000.0)
    flow: str = option("dis", "optical flow: dis (OpenCV's DIS on the CPU, no weights) or raft (torchvision's "
                       "RAFT on the device; its weights are downloaded once into the torch hub cache)",
                       choices=("dis", "raft"))
    mode: str = option("sequential", "sequential (each frame after the previous: best consistency) or multipass "
                       "(windows of frames optimised as one batch, then passes alternating direction that pull "
                       "neighbours together; --iterations is split over the passes)",
                       choices=("sequential", "multipass"))
    passes: int = option(15, "multipass: passes after the first (independent) one, Ruder et al.'s number; no "
                         "more than the iterations left after the first pass, which takes half", metavar="P",
                         minimum=1, maximum=100)
    window: int = option(8, "multipass: frames optimised together as one batch", metavar="N",
                         minimum=1, maximum=1024)
    force: bool = option(False, "render every frame again: first remove what an earlier command left in the "
                         "work folder (frames, manifest, passes, flows)")

    def __post_init__(self) -> None:
        if isinstance(self.temporal_frames, (list, int)):
            self.temporal_frames = tuple(self.temporal_frames) if isinstance(self.temporal_frames, list) \
                else (self.temporal_frames,)

    def validate(self) -> "VideoConfig":
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        return self


@dataclass
class BatchConfig:
    """Options of ``fastnst batch`` beyond the stylisation options (which StyleConfig holds and
    every job inherits unless its line in --jobs overrides them)."""

    content: tuple[str, ...] | None = option(None, "content images: files, folders (their images) or glob "
                                             "patterns", metavar="PATH", many=True)
    style: tuple[str, ...] | None = option(None, "style images; every content x style pair is a job",
                                           metavar="FILE", many=True)
    jobs: str | None = option(None, "a JSON-lines file, one job per line: {\"content\": ..., \"style\": ... "
                              "or [...], optional \"name\" and any stylize option, e.g. \"size\", \"seed\"}",
                              metavar="FILE")
    out: str | None = option(None, "output folder (created if missing); also holds manifest.jsonl",
                             metavar="DIR", required=True)
    variations: int = option(1, "noise-initialised variants of each job, with seeds seed, seed+1, ...",
                             metavar="K", minimum=1, maximum=10_000)
    name: str | None = option(None, "output name template with {content} {style} {variation} {seed} {size} "
                              "(default: {content}__{style}.png, with __v{variation} when K > 1); the "
                              "extension picks the format", metavar="TEMPLATE")
    batch_size: str = option("auto", "images optimised together: a number, or auto (as many as fit the "
                             "free memory, at most 16)", metavar="N|auto")
    force: bool = option(False, "render jobs again even if the manifest says they are done")

    def __post_init__(self) -> None:
        for name in ("content", "style"):
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                setattr(self, name, tuple(value) if isinstance(value, list) else (value,))
        if isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool):
            self.batch_size = str(self.batch_size)

    def validate(self) -> "BatchConfig":
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        if not self.out:
            raise ConfigError("--out DIR is required")
        if self.jobs is None and not (self.content and self.style):
            raise ConfigError("give --content and --style, or --jobs FILE")
        if self.jobs is not None and (self.content or self.style):
            raise ConfigError("give --jobs FILE or --content/--style, not both")
        if self.batch_size != "auto" and (not self.batch_size.isdigit() or int(self.batch_size) < 1):
            raise ConfigError(f"--batch-size must be auto or a whole number >= 1, not '{self.batch_size}'")
        return self
