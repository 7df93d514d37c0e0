"""Exact tiled style transfer: the untiled objective, computed tile by tile.

The image is cut into tiles whose interiors partition it; interiors start on multiples of 16 px,
so every tile's pooling grid coincides with the full image's.  Each tile is run through VGG with a
halo around its interior, wide enough that the features of the interior equal the full image's
(``exact_halo``).  Grams add over positions, so

- pass 1 runs each tile forward (no grad) and sums the Grams of its interior features: the whole
  image's Gram G_l, hence D_l = G_l - A_l and the style loss;
- pass 2 runs each tile forward and backward on the surrogate
      alpha sum_c v_c 1/2 sum_interior (F - P)^2  +  beta sum_l w_l 2 s_l <D_l, F F^T>_interior
  (D_l constant, s_l = 1 / (4 N^2 M^2)), whose gradient with respect to the interior features is
  the true one (4 s_l D_l F for a symmetric D_l), and adds the tile's whole input gradient, halo
  included, into the full-image gradient.  Every feature position is counted once, in the tile
  whose interior holds it.

The content loss is summed over interiors in pass 2; TV acts on the whole image.  Targets for
large content and style images are computed the same way, tile by tile.  With ``reduce`` and a
``share`` of the tiles (distributed.py), ranks process disjoint tiles and sum their Grams, losses
and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .objective import StyleObjective, total_variation
from .vgg import LAYERS, layer_stride

ALIGN = 16  # 2^4 poolings before conv5_1: interiors aligned to this keep every pooling grid intact


def exact_halo(layers: Sequence[str]) -> int:
    """The smallest halo (px, a multiple of 16) that makes interior features exact.

    Walks VGG19 up to the deepest layer and tracks how far, in input pixels, a tile edge's zero
    padding reaches: a 3x3 convolution spreads it by one position at the current stride; a 2x2
    pooling keeps every pooled position that sees a contaminated input.  For conv5_1: 80 px.
    """
    deepest = max(LAYERS[name][0] for name in layers)
    depth, stride = 0, 1
    index = 0
    for block in (2, 2, 4, 4, 4):
        for _ in range(block):
            if index > deepest:
                break
            depth += stride  # conv 3x3, padding 1
            index += 2  # conv and its ReLU
        if index > deepest:
            break
        positions = math.ceil(depth / stride)
        stride *= 2
        depth = math.ceil(positions / 2) * stride  # pooling 2x2, stride 2
        index += 1
    return math.ceil(depth / ALIGN) * ALIGN


@dataclass(frozen=True)
class Tile:
    """A tile: its interior (the positions it owns) and its region (interior + halo), in px."""

    interior: tuple[int, int, int, int]  # y0, y1, x0, x1
    region: tuple[int, int, int, int]

    def interior_at(self, stride: int) -> tuple[slice, slice]:
        """The interior as slices of the tile's own feature grid at a layer of this stride."""
        (y0, y1, x0, x1), (ry0, _, rx0, _) = self.interior, self.region
        return (slice((y0 - ry0) // stride, y1 // stride - ry0 // stride),
                slice((x0 - rx0) // stride, x1 // stride - rx0 // stride))


def _cuts(length: int, tile: int) -> list[tuple[int, int]]:
    """Interior intervals along one axis: multiples of ``tile``; a last sliver under 16 px joins
    its neighbour (it would own no position at conv5_1)."""
    edges = list(range(0, length, tile)) + [length]
    if len(edges) > 2 and edges[-1] - edges[-2] < ALIGN:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:]))


def tile_grid(height: int, width: int, tile: int, halo: int) -> list[Tile]:
    """Tiles covering a height x width image with interiors of ``tile`` px (a multiple of 16)."""
    if tile % ALIGN or tile <= 0:
        raise ValueError(f"tile size must be a positive multiple of {ALIGN}, not {tile}")
    if halo % ALIGN or halo < 0:
        raise ValueError(f"halo must be a non-negative multiple of {ALIGN}, not {halo}")
    tiles = []
    for y0, y1 in _cuts(height, tile):
        for x0, x1 in _cuts(width, tile):
            region = (max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo))
            tiles.append(Tile(interior=(y0, y1, x0, x1), region=region))
    return tiles


def _crop(image: torch.Tensor, tile: Tile) -> torch.Tensor:
    ry0, ry1, rx0, rx1 = tile.region
    return image[:, :, ry0:ry1, rx0:rx1]


def _interior(features: torch.Tensor, tile: Tile, stride: int) -> torch.Tensor:
    rows, cols = tile.interior_at(stride)
    return features[:, :, rows, cols]


def _no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class TiledObjective(StyleObjective):
    """The style objective of one image, evaluated over tiles with exact results.

    ``tile``: interior size in px (multiple of 16).  ``halo``: None for the exact one, or fewer
    pixels for speed (approximate).  ``autocast``: the precision context of the network.
    ``share`` picks this process's tiles and ``reduce`` sums a tensor over processes in place.
    """

    def __init__(self, network, content: torch.Tensor, styles: Sequence[torch.Tensor], config, tile: int,
                 halo: int | None = None, autocast: Callable = None,
                 share: Callable[[list[Tile]], list[Tile]] = lambda tiles: tiles,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduce):
        import contextlib

        self.tile = int(tile)
        self.halo = exact_halo(network.layers) if halo is None else int(halo)
        self.autocast = autocast or contextlib.nullcontext
        self.share, self.reduce = share, reduce
        self.strides = {slot: layer_stride(name) for slot, name in enumerate(network.layers)}
        super().__init__(network, content, styles, config)
        self.tiles = tile_grid(content.shape[-2], content.shape[-1], self.tile, self.halo)

    # ---- targets, tile by tile --------------------------------------------------------------

    def _content_targets(self, content):
        height, width = content.shape[-2:]
        tiles = tile_grid(height, width, self.tile, self.halo)
        targets = []
        for slot in self.content_slots:
            stride = self.strides[slot]
            channels = self.network_channels(slot)
            # fp32 whatever the network's precision: a full-size map assembled across processes
            # must survive all_reduce on every backend (gloo has no bf16 sum).
            targets.append(content.new_zeros((1, channels, height // stride, width // stride),
                                             dtype=torch.float32))
        for tile in self.share(tiles):
            with torch.no_grad(), self.autocast():
                features = self.network(_crop(content, tile))
            for target, slot in zip(targets, self.content_slots):
                stride = self.strides[slot]
                (y0, y1, x0, x1) = tile.interior
                target[:, :, y0 // stride:y1 // stride, x0 // stride:x1 // stride] = \
                    _interior(features[slot], tile, stride)
        for target in targets:
            self.reduce(target)  # interiors are disjoint: the sum assembles the whole map
        positions = [(height // self.strides[s]) * (width // self.strides[s]) for s in self.style_slots]
        return tuple(targets), positions

    def _style_grams(self, style):
        height, width = style.shape[-2:]
        grams = self._summed_grams(style, tile_grid(height, width, self.tile, self.halo))
        return [(gram, (height // self.strides[s]) * (width // self.strides[s]))
                for gram, s in zip(grams, self.style_slots)]

    def _summed_grams(self, image: torch.Tensor, tiles: list[Tile]) -> list[torch.Tensor]:
        """The whole image's Gram at each style layer: interior Grams summed over (all ranks') tiles."""
        grams = [None] * len(self.style_slots)
        for tile in self.share(tiles):
            with torch.no_grad(), self.autocast():
                features = self.network(_crop(image, tile))
            for i, slot in enumerate(self.style_slots):
                gram = self.ops.gram(_interior(features[slot], tile, self.strides[slot]))[0]
                grams[i] = gram if grams[i] is None else grams[i] + gram
        channels = [self.network_channels(s) for s in self.style_slots]
        grams = [g if g is not None else image.new_zeros((c, c), dtype=torch.float32)
                 for g, c in zip(grams, channels)]
        for gram in grams:
            self.reduce(gram)
        return grams

    def network_channels(self, slot: int) -> int:
        from .vgg import layer_channels

        return layer_channels(self.network.layers[slot])

    # ---- loss and gradient ------------------------------------------------------------------

    def loss_and_grad(self, image: torch.Tensor, scale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The total loss (fp32 scalar) and its gradient with respect to ``image`` (fp32), the
        gradient multiplied by ``scale`` when given (fp16 loss scaling)."""
        image = image.detach()
        grams = self._summed_grams(image, self.tiles)  # pass 1
        diffs, style_loss = [], image.new_zeros((), dtype=torch.float32)
        for gram, target, weight, slot in zip(grams, self.style_targets, self.style_layer_weights,
                                              self.style_slots):
            channels, positions = gram.shape[0], self._positions(image, slot)
            s = 1.0 / (4.0 * channels**2 * positions**2)
            diff = gram - target
            style_loss = style_loss + diff.square().sum() * (self.beta * weight * s)
            diffs.append(diff * (2.0 * s * self.beta * weight))  # the surrogate's constant factor
        grad = torch.zeros_like(image, dtype=torch.float32)
        content_loss = image.new_zeros((), dtype=torch.float32)
        for tile in self.share(self.tiles):  # pass 2
            piece = _crop(image, tile).clone().requires_grad_(True)
            with self.autocast():
                features = self.network(piece)
            content_part = piece.new_zeros((), dtype=torch.float32)
            for slot, target, v in zip(self.content_slots, self.content_targets, self.content_layer_weights):
                stride = self.strides[slot]
                y0, y1, x0, x1 = tile.interior
                p = target[:, :, y0 // stride:y1 // stride, x0 // stride:x1 // stride]
                content_part = content_part + self.ops.content_loss(
                    _interior(features[slot], tile, stride), p) * (self.alpha * v)
            surrogate = content_part
            for slot, diff in zip(self.style_slots, diffs):
                f = _interior(features[slot], tile, self.strides[slot])
                surrogate = surrogate + (self.ops.gram(f)[0] * diff).sum()
            if scale is not None:
                surrogate = surrogate * scale
            (piece_grad,) = torch.autograd.grad(surrogate, piece)
            ry0, ry1, rx0, rx1 = tile.region
            grad[:, :, ry0:ry1, rx0:rx1] += piece_grad.float()
            content_loss = content_loss + content_part.detach()
        self.reduce(grad)
        self.reduce(content_loss)
        loss = content_loss + style_loss
        if self.tv_weight:
            tv_image = image.clone().requires_grad_(True)
            tv = total_variation(tv_image) * self.tv_weight
            (tv_grad,) = torch.autograd.grad(tv * scale if scale is not None else tv, tv_image)
            grad += tv_grad
            loss = loss + tv.detach()
        return loss, grad

    def _positions(self, image: torch.Tensor, slot: int) -> int:
        stride = self.strides[slot]
        return (image.shape[-2] // stride) * (image.shape[-1] // stride)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.loss_and_grad(image)[0]
