"""The style-transfer objective: targets, computed once, and ``loss_and_grad``.

    L_b = alpha * sum_c v_c * L_c  +  beta * sum_l w_l * E_l  +  tv * TV  [+ temporal terms]   per sample b

L_c = 1/2 sum (F - P)^2 (content), E_l = sum (G - A)^2 / (4 N^2 M^2) (style, normalised in
``kernels.reference.style_normaliser``), TV the sum of squared differences of neighbouring pixels.
With several style images the target A_l is their blend-weighted mean Gram.  A style image of
another size than the output has a Gram summed over a different number of positions M_s, so each
style Gram is rescaled by M_out / M_s before blending; when the sizes match this factor is 1.

Every objective answers ``loss_and_grad(image, scale) -> (per-sample losses (B,), gradient)``; the
gradient is that of the summed losses (times ``scale``, fp16 loss scaling), and since samples never
interact, each sample's part is its own objective's gradient.  The untiled objective gets it from
autograd; ``tiling.Tiler`` computes it tile by tile over the same targets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .config import ObjectiveOptions, default_loss_weights
from .errors import ConfigError
from .kernels.backend import ops as kernel_ops
from .kernels.meancov import MeanCovTarget
from .vgg import VGGFeatures, layer_channels, layer_stride


def feature_layers(config: ObjectiveOptions) -> tuple[str, ...]:
    """The layers the network must return: content layers then style layers, without repeats."""
    return tuple(dict.fromkeys((*config.content_layers, *config.style_layers)))


def check_fits(image: Image.Image | tuple[int, int], layers: Sequence[str], what: str) -> None:
    """The deepest layer needs at least one feature position: each side >= its pooling stride.
    ``image``: an image, or its (width, height)."""
    need = max(layer_stride(name) for name in layers)
    size = image if isinstance(image, tuple) else image.size
    if min(size) < need:
        raise ConfigError(f"the {what} is {size[0]}x{size[1]} px after resizing; the "
                          f"layers used need at least {need} px on each side (raise --size or "
                          f"--style-scale, or use shallower layers)")


def default_content_layer_weight(channels: int, positions: int) -> float:
    """v_c = 2 / (N M): turns 1/2 sum (F - P)^2 into the tutorial's mean squared error."""
    return 2.0 / (channels * positions)


def default_style_layer_weight(channels: int) -> float:
    """w_l = 4 / N^2: turns E_l into the tutorial's MSE between Grams divided by N*M."""
    return 4.0 / channels**2


class _NormalizedGradient(torch.autograd.Function):
    """Identity forward; backward scales each sample's gradient to unit L1 norm times ``weight``
    (neural-style's -normalize_gradients: the term's gradient at its layer divided by its L1 norm
    plus 1e-8, then weighted).  The incoming gradient already carries the term's weight and any
    fp16 loss scale, ``weight`` (the same product), so it is divided out of the norm first."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
        ctx.weight = weight
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        norm = grad.float().abs().flatten(1).sum(1) / ctx.weight  # |dE/dF|_1 per sample
        scale = (1.0 / (norm + 1e-8)).view(-1, *([1] * (grad.dim() - 1)))  # weight dE/dF / (|dE/dF|_1 + 1e-8)
        return (grad * scale.to(grad.dtype)), None


def normalized_gradient(features: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """``features`` unchanged, but the gradient reaching them through a term of weight ``weight``
    is that term's own gradient direction, of L1 norm ``weight`` per sample."""
    return _NormalizedGradient.apply(features, weight)


def _mask_at(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """A (1, 1, H, W) mask in [0, 1] averaged down to a layer's grid (H // stride, W // stride),
    the same flooring as VGG's pooling."""
    return F.avg_pool2d(mask, stride) if stride > 1 else mask


@dataclass(frozen=True)
class TemporalTarget:
    """A video frame's pull towards an earlier stylised frame (Ruder et al., GCPR 2016): that frame
    warped onto this one, the mask of pixels where the warp can be trusted, and the term's weight.
    The term is weight * sum(mask * (x - target)^2) / D per sample, D = 3 H W values."""

    target: torch.Tensor  # (B, 3, H, W)
    mask: torch.Tensor  # (B, 1, H, W) in [0, 1]
    weight: float


def temporal_loss(image: torch.Tensor, temporal: TemporalTarget) -> torch.Tensor:
    """(B,) fp32 (fp64 for fp64 images): the unweighted temporal term, the mean over the D = 3 H W
    values of mask * (x - target)^2."""
    wide = torch.float64 if image.dtype == torch.float64 else torch.float32
    difference = (image.to(wide) - temporal.target.to(wide)).square() * temporal.mask.to(wide)
    return difference.flatten(1).sum(1) / image[0].numel()


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """(B,) fp32: the sum of squared differences between vertically and horizontally adjacent pixels."""
    image = image.float()
    dy = image[..., 1:, :] - image[..., :-1, :]
    dx = image[..., :, 1:] - image[..., :, :-1]
    return dy.square().flatten(1).sum(dim=1) + dx.square().flatten(1).sum(dim=1)


def autograd_loss_and_grad(losses: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                           scale: torch.Tensor | None, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses(image) as (B,), the gradient of their sum times ``scale``) through autograd."""
    with autocast():
        values = losses(image).reshape(-1)
    total = values.sum()
    (grad,) = torch.autograd.grad(total if scale is None else total * scale, image)
    return values.detach(), grad


class Autograd:
    """Any differentiable loss function as an objective (a scalar loss counts as one sample)."""

    def __init__(self, losses: Callable[[torch.Tensor], torch.Tensor], autocast=contextlib.nullcontext):
        self.losses, self.autocast = losses, autocast

    def loss_and_grad(self, image: torch.Tensor, scale: torch.Tensor | None = None):
        return autograd_loss_and_grad(self.losses, image, scale, self.autocast)


class Features:
    """How targets see an image: one pass of the network.  tiling.TiledFeatures is the tiled twin."""

    def __init__(self, network: VGGFeatures, ops):
        self.network, self.ops = network, ops

    def maps(self, image: torch.Tensor, slots: Sequence[int]) -> list[torch.Tensor]:
        """The feature maps at ``slots`` (content targets)."""
        features = self.network(image)
        return [features[s].detach().clone() for s in slots]

    def grams(self, image: torch.Tensor, slots: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """(Gram (C, C), positions) of a one-image batch at each slot (style targets)."""
        features = self.network(image)
        return [(self.ops.gram(features[s])[0], features[s][0, 0].numel()) for s in slots]


class StyleObjective:
    """The targets P_c and A_l of one batch, and its loss at an image of the content's size.

    ``content`` is (B, 3, H, W).  ``styles`` is a list of style images shared by every sample, or,
    for a batch of different jobs, a list of B such lists (one per sample); then the targets are
    (B, C, C) and every sample is optimised towards its own.  ``config``: the objective's options
    (a whole StyleConfig will do) give the layers and weights; ``ops`` the kernels (default: the
    backend in force for the device); ``autocast`` the network's precision, used for the targets
    and the loss alike; ``features`` how targets see an image (untiled by default).  ``regions`` /
    ``style_regions``: spatial control (one image).
    """

    def __init__(self, network: VGGFeatures, content: torch.Tensor, styles: Sequence, config: ObjectiveOptions,
                 *, ops=None, autocast=contextlib.nullcontext, features: Features | None = None,
                 regions: Sequence[torch.Tensor] | None = None,
                 style_regions: Sequence[torch.Tensor | None] | None = None,
                 temporal: Sequence[TemporalTarget] = ()):
        if not styles:
            raise ValueError("at least one style image is needed")
        per_sample = isinstance(styles[0], (list, tuple))
        if per_sample and len(styles) != content.shape[0]:
            raise ValueError(f"{len(styles)} style lists for a batch of {content.shape[0]} content images")
        layers = network.layers
        self.network, self.autocast = network, autocast
        self.ops = ops if ops is not None else kernel_ops(content.device)
        self.features = features or Features(network, self.ops)
        self.content_layers = tuple(config.content_layers)
        self.style_layers = tuple(config.style_layers)
        self.content_slots = tuple(layers.index(name) for name in self.content_layers)
        self.style_slots = tuple(layers.index(name) for name in self.style_layers)
        self.style_loss = config.style_loss
        alpha, beta = default_loss_weights(self.style_loss, getattr(network, "weights_format", "torchvision"))
        self.alpha = float(config.content_weight if config.content_weight is not None else alpha)
        self.beta = float(config.style_weight if config.style_weight is not None else beta)
        self.tv_weight = float(config.tv_weight)
        self.temporal = tuple(temporal)
        self.normalize_gradients = bool(config.normalize_gradients)
        if self.style_loss != "gram" and regions is not None:
            raise ValueError("spatial control needs the Gram style loss")

        self.regions = None  # spatial control: per style, its output region at each style layer
        with torch.no_grad(), autocast():
            self.content_targets = tuple(self.features.maps(content, self.content_slots))
            height, width = content.shape[-2:]
            out_positions = [(height // layer_stride(n)) * (width // layer_stride(n)) for n in self.style_layers]
            if regions is not None:
                self._masked_targets(styles, regions, style_regions or [None] * len(styles),
                                     config.style_blend_weights)
            elif self.style_loss == "meancov":
                targets = [self._blended_moments(own, config.style_blend_weights)
                           for own in (styles if per_sample else [styles])]
                self.style_targets = tuple(MeanCovTarget.stack(layer) if per_sample else layer[0]
                                           for layer in zip(*targets))
            elif per_sample:
                targets = [self._blended_grams(own, config.style_blend_weights, out_positions) for own in styles]
                self.style_targets = tuple(torch.stack(layer) for layer in zip(*targets))
            else:
                self.style_targets = self._blended_grams(styles, config.style_blend_weights, out_positions)

        self.content_layer_weights = tuple(
            config.content_layer_weights if config.content_layer_weights is not None else
            (default_content_layer_weight(p.shape[1], p[0, 0].numel()) for p in self.content_targets))
        self.style_layer_weights = tuple(
            config.style_layer_weights if config.style_layer_weights is not None else
            (1.0 / len(self.style_layers),) * len(self.style_layers) if self.style_loss == "meancov" else
            (default_style_layer_weight(layer_channels(name)) for name in self.style_layers))

    def _masked_targets(self, styles, regions, style_regions, blend) -> None:
        """Spatial control (Gatys et al. 2017, sec. 4): style s acts only where its region mask is
        white.  Grams are taken over masked features, F * m with the mask averaged down to each
        layer's grid, and compared per masked position: E uses M_r = sum of the mask values, and
        A_s is rescaled from the style's masked positions to the output region's."""
        if len(regions) != len(styles):
            raise ValueError(f"{len(regions)} region masks for {len(styles)} style images")
        if self.content_targets[0].shape[0] != 1:
            raise ValueError("spatial control renders one image at a time, not a batch")
        self.regions = [[_mask_at(region, layer_stride(name)) for name in self.style_layers] for region in regions]
        # (M / M_r)^2 per style and layer, computed once: the loop must not read values back.
        self.region_corrections = [[(mask[0, 0].numel() / max(float(mask.sum()), 1e-12)) ** 2 for mask in region]
                                   for region in self.regions]
        self.region_weights = tuple(blend) if blend is not None else (1.0,) * len(styles)
        self.style_targets = []
        for style, region, style_region in zip(styles, self.regions, style_regions):
            features = self.network(style)
            targets = []
            for slot, name, out_mask in zip(self.style_slots, self.style_layers, region):
                masked = features[slot]
                positions = float(masked[0, 0].numel())
                if style_region is not None:
                    style_mask = _mask_at(style_region, layer_stride(name))
                    masked = masked * style_mask
                    positions = float(style_mask.sum())
                gram = self.ops.gram(masked)[0] * (float(out_mask.sum()) / max(positions, 1e-12))
                targets.append(0.5 * (gram + gram.transpose(0, 1)))
            self.style_targets.append(tuple(targets))

    def _blended_grams(self, styles: Sequence[torch.Tensor], blend: Sequence[float] | None,
                       out_positions: Sequence[int]) -> tuple[torch.Tensor, ...]:
        blend = list(blend) if blend is not None else [1.0] * len(styles)
        total = float(sum(blend))
        targets: list[torch.Tensor | None] = [None] * len(self.style_slots)
        for style, share in zip(styles, blend):
            for i, (gram, positions) in enumerate(self.features.grams(style, self.style_slots)):
                term = gram * ((share / total) * out_positions[i] / positions)
                targets[i] = term if targets[i] is None else targets[i] + term
        # Exactly symmetric, as a Gram is in exact arithmetic: the gradient formulas rely on it.
        return tuple(0.5 * (t + t.transpose(0, 1)) for t in targets)  # type: ignore[union-attr]

    def _blended_moments(self, styles: Sequence[torch.Tensor], blend: Sequence[float] | None
                         ) -> tuple[MeanCovTarget, ...]:
        """Mean-covariance targets: the blend-weighted means and second raw moments (F F^T / M, per
        position, so styles of any size blend), which combine linearly, unlike covariances."""
        blend = list(blend) if blend is not None else [1.0] * len(styles)
        total = float(sum(blend))
        sums: list[list[torch.Tensor] | None] = [None] * len(self.style_slots)
        for style, share in zip(styles, blend):
            features = self.network(style)
            for i, slot in enumerate(self.style_slots):
                f = features[slot].float()
                moments = [f.flatten(2).mean(2)[0] * (share / total),
                           self.ops.gram(f)[0] * (share / total / f[0, 0].numel())]
                sums[i] = moments if sums[i] is None else [a + b for a, b in zip(sums[i], moments)]
        return tuple(MeanCovTarget.from_moments(mean, second) for mean, second in sums)  # type: ignore[misc]

    def _at_layer(self, features: torch.Tensor, weight: float, scale: torch.Tensor | None) -> torch.Tensor:
        """A layer's features as a term of weight ``weight`` sees them: with --normalize-gradients
        the term's gradient there is rescaled to L1 norm ``weight`` (times the fp16 loss scale)."""
        if not self.normalize_gradients or weight == 0:  # a term of weight 0 has no gradient to scale
            return features
        return normalized_gradient(features, weight if scale is None else scale * weight)

    def _weighted_terms(self, image: torch.Tensor, scale: torch.Tensor | None = None):
        """Yield (name, per-sample unweighted values (B,), weight) for every term of the loss;
        ``scale``, the fp16 loss scale the gradient will carry (for --normalize-gradients)."""
        features = self.network(image)
        for name, slot, target, v in zip(self.content_layers, self.content_slots, self.content_targets,
                                         self.content_layer_weights):
            weight = self.alpha * v
            values = self.ops.content_losses(self._at_layer(features[slot], weight, scale), target)
            yield f"content:{name}", values, weight
        if self.style_loss == "meancov":
            for name, slot, target, w in zip(self.style_layers, self.style_slots, self.style_targets,
                                             self.style_layer_weights):
                weight = self.beta * w
                values = self.ops.meancov_losses(self._at_layer(features[slot], weight, scale), target)
                yield f"style:{name}", values, weight
        elif self.regions is None and self.style_slots:
            # All style layers at once: on Triton one launch forward and one backward for them all.
            weights = [self.beta * w for w in self.style_layer_weights]
            values = self.ops.grouped_style_losses([self._at_layer(features[slot], weight, scale)
                                                    for slot, weight in zip(self.style_slots, weights)],
                                                   list(self.style_targets))
            for name, layer_values, w in zip(self.style_layers, values, self.style_layer_weights):
                yield f"style:{name}", layer_values, self.beta * w
        else:
            for index, (region, corrections, targets, share) in enumerate(zip(
                    self.regions, self.region_corrections, self.style_targets, self.region_weights)):
                for name, slot, mask, correction, target, w in zip(self.style_layers, self.style_slots, region,
                                                                   corrections, targets, self.style_layer_weights):
                    # style_losses normalise by all M positions; the region has M_r = sum(mask).  The
                    # mask is cast to the features' dtype so a masked layer computes in the run's
                    # precision, as an unmasked one does (an all-white mask gives the unmasked run).
                    masked = features[slot] * mask.to(features[slot].dtype)
                    weight = self.beta * w * share
                    values = self.ops.style_losses(self._at_layer(masked, weight * correction, scale), target)
                    yield f"style:{name}:{index}", values * correction, weight
        yield from self._image_terms(image)

    def _image_terms(self, image: torch.Tensor):
        """The terms on the image itself, no network: total variation, temporal consistency."""
        if self.tv_weight:
            yield "tv", total_variation(image), self.tv_weight
        for index, temporal in enumerate(self.temporal):
            yield f"temporal:{index}", temporal_loss(image, temporal), temporal.weight

    @property
    def has_image_terms(self) -> bool:
        return bool(self.tv_weight or self.temporal)

    def image_terms(self, image: torch.Tensor) -> torch.Tensor:
        """(B,) the weighted sum of the terms on the image itself (the tiler adds them whole)."""
        return sum(values * weight for _, values, weight in self._image_terms(image))

    def losses(self, image: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of each sample, (B,) fp32, differentiable with respect to ``image``."""
        return sum(values * weight for _, values, weight in self._weighted_terms(image, scale))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """The total loss over the batch, an fp32 scalar."""
        return self.losses(image).sum()

    def loss_and_grad(self, image: torch.Tensor, scale: torch.Tensor | None = None):
        """(per-sample losses (B,), gradient of their sum [times scale]) under the run's autocast;
        with --normalize-gradients the gradient is the normalised one (``normalized_gradient``)."""
        return autograd_loss_and_grad(lambda x: self.losses(x, scale), image, scale, self.autocast)

    def terms(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each unweighted term summed over the batch (``content:<layer>``, ``style:<layer>``, ``tv``
        if on) and ``total``."""
        terms: dict[str, torch.Tensor] = {}
        total = image.new_zeros((), dtype=torch.float32)
        for name, values, weight in self._weighted_terms(image):
            terms[name] = values.sum()
            total = total + terms[name] * weight
        terms["total"] = total
        return terms
