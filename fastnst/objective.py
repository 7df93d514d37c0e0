"""The style-transfer objective of one image: targets, computed once, and the loss.

    L = alpha * sum_c v_c * L_c  +  beta * sum_l w_l * E_l  +  tv * TV

L_c = 1/2 sum (F - P)^2 (content), E_l = sum (G - A)^2 / (4 N^2 M^2) (style), TV the sum of
squared differences of neighbouring pixels.  With several style images the target A_l is their
blend-weighted mean Gram.  A style image of another size than the output has a Gram summed over
a different number of positions M_s, so each style Gram is rescaled by M_out / M_s before
blending; when the sizes match (the paper's setting) this factor is 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import kernels
from .config import StyleConfig
from .vgg import VGGFeatures, layer_channels, layer_stride


def feature_layers(config: StyleConfig) -> tuple[str, ...]:
    """The layers the network must return: content layers then style layers, without repeats."""
    return tuple(dict.fromkeys((*config.content_layers, *config.style_layers)))


def default_content_layer_weight(channels: int, positions: int) -> float:
    """v_c = 2 / (N M): turns 1/2 sum (F - P)^2 into the tutorial's mean squared error."""
    return 2.0 / (channels * positions)


def default_style_layer_weight(channels: int) -> float:
    """w_l = 4 / N^2: turns E_l into the tutorial's MSE between Grams divided by N*M."""
    return 4.0 / channels**2


def _mask_at(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """A (1, 1, H, W) mask in [0, 1] averaged down to a layer's grid (H // stride, W // stride),
    the same flooring as VGG's pooling."""
    return F.avg_pool2d(mask, stride) if stride > 1 else mask


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences between vertically and horizontally adjacent pixels (fp32)."""
    image = image.float()
    dy = image[..., 1:, :] - image[..., :-1, :]
    dx = image[..., :, 1:] - image[..., :, :-1]
    return dy.square().sum() + dx.square().sum()


class StyleObjective:
    """Holds the targets P_c and A_l and evaluates the loss of an image of the content's size.

    ``content`` is (B, 3, H, W).  ``styles`` is a list of style images shared by every sample, or,
    for a batch of different jobs, a list of B such lists (one per sample); then the targets are
    (B, C, C) and every sample is optimised towards its own.  The loss is the sum over samples, and
    samples never interact, so each one's gradient is that of its own objective.
    """

    def __init__(self, network: VGGFeatures, content: torch.Tensor, styles: Sequence, config: StyleConfig,
                 regions: Sequence[torch.Tensor] | None = None,
                 style_regions: Sequence[torch.Tensor | None] | None = None):
        if not styles:
            raise ValueError("at least one style image is needed")
        per_sample = isinstance(styles[0], (list, tuple))
        if per_sample and len(styles) != content.shape[0]:
            raise ValueError(f"{len(styles)} style lists for a batch of {content.shape[0]} content images")
        layers = network.layers
        self.network = network
        # The kernels (Triton or the PyTorch twins) are chosen once, for the content's device.
        self.ops = kernels.ops(content.device, config.backend)
        self.content_layers = tuple(config.content_layers)
        self.style_layers = tuple(config.style_layers)
        self.content_slots = tuple(layers.index(name) for name in self.content_layers)
        self.style_slots = tuple(layers.index(name) for name in self.style_layers)
        self.alpha = float(config.content_weight)
        self.beta = float(config.style_weight)
        self.tv_weight = float(config.tv_weight)

        self.regions = None  # spatial control: per style, its output region at each style layer
        with torch.no_grad():
            self.content_targets, out_positions = self._content_targets(content)
            if regions is not None:
                self._masked_targets(styles, regions, style_regions or [None] * len(styles),
                                     config.style_blend_weights)
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

    def _content_targets(self, content: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], list[int]]:
        """P for each content layer, and the number of positions of each style layer's features
        for an image of the content's size.  Overridden by the tiled objective."""
        features = self.network(content)
        targets = tuple(features[s].detach().clone() for s in self.content_slots)
        return targets, [features[s][0, 0].numel() for s in self.style_slots]

    def _style_grams(self, style: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """(Gram (C, C), positions) of ``style`` at each style layer.  Overridden by the tiled objective."""
        features = self.network(style)
        return [(self.ops.gram(features[s])[0], features[s][0, 0].numel()) for s in self.style_slots]

    def _blended_grams(self, styles: Sequence[torch.Tensor], blend: Sequence[float] | None,
                       out_positions: Sequence[int]) -> tuple[torch.Tensor, ...]:
        blend = list(blend) if blend is not None else [1.0] * len(styles)
        total = float(sum(blend))
        targets: list[torch.Tensor | None] = [None] * len(self.style_slots)
        for style, share in zip(styles, blend):
            for i, (gram, positions) in enumerate(self._style_grams(style)):
                term = gram * ((share / total) * out_positions[i] / positions)
                targets[i] = term if targets[i] is None else targets[i] + term
        # Exactly symmetric, as a Gram is in exact arithmetic: the gradient formulas rely on it.
        return tuple(0.5 * (t + t.transpose(0, 1)) for t in targets)  # type: ignore[union-attr]

    def _weighted_terms(self, image: torch.Tensor):
        """Yield (name, unweighted value, weight) for every term of the loss."""
        features = self.network(image)
        for name, slot, target, v in zip(self.content_layers, self.content_slots, self.content_targets,
                                         self.content_layer_weights):
            yield f"content:{name}", self.ops.content_loss(features[slot], target), self.alpha * v
        if self.regions is None:
            for name, slot, target, w in zip(self.style_layers, self.style_slots, self.style_targets,
                                             self.style_layer_weights):
                yield f"style:{name}", self.ops.style_loss(features[slot], target), self.beta * w
        else:
            for index, (region, corrections, targets, share) in enumerate(zip(
                    self.regions, self.region_corrections, self.style_targets, self.region_weights)):
                for name, slot, mask, correction, target, w in zip(self.style_layers, self.style_slots, region,
                                                                   corrections, targets, self.style_layer_weights):
                    # style_loss normalises by all M positions; the region has M_r = sum(mask).
                    yield (f"style:{name}:{index}", self.ops.style_loss(features[slot] * mask, target) * correction,
                           self.beta * w * share)
        if self.tv_weight:
            yield "tv", total_variation(image), self.tv_weight

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """The total loss, an fp32 scalar."""
        return sum(value * weight for _, value, weight in self._weighted_terms(image))

    @torch.no_grad()
    def per_sample_losses(self, image: torch.Tensor) -> list[float]:
        """The total loss of each sample of a batch (for reports; one forward, no gradient)."""
        if image.shape[0] == 1:
            return [float(self(image))]
        features = self.network(image)
        losses = []
        for b in range(image.shape[0]):
            loss = 0.0
            for slot, target, v in zip(self.content_slots, self.content_targets, self.content_layer_weights):
                loss += float(self.ops.content_loss(features[slot][b:b + 1], target[b:b + 1])) * self.alpha * v
            for slot, target, w in zip(self.style_slots, self.style_targets, self.style_layer_weights):
                own = target[b] if target.dim() == 3 else target
                loss += float(self.ops.style_loss(features[slot][b:b + 1], own)) * self.beta * w
            if self.tv_weight:
                loss += float(total_variation(image[b:b + 1])) * self.tv_weight
            losses.append(loss)
        return losses

    def terms(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each unweighted term (``content:<layer>``, ``style:<layer>``, ``tv`` if on) and ``total``."""
        terms: dict[str, torch.Tensor] = {}
        total = image.new_zeros((), dtype=torch.float32)
        for name, value, weight in self._weighted_terms(image):
            terms[name] = value
            total = total + value * weight
        terms["total"] = total
        return terms
