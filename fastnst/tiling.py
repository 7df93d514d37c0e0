"""Exact tiled style transfer: the objective's targets and its loss and gradient, tile by tile.

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
large content and style images are computed the same way, tile by tile: ``TiledFeatures`` is how
the objective sees an image, ``Tiler`` its loss and gradient over those targets.  With ``reduce``
and a ``share`` of the tiles (distributed.py), ranks process disjoint tiles and sum their Grams,
losses and gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .kernels.reference import style_normaliser
from .measure import ALIGN  # 2^4 poolings before conv5_1: interiors aligned to 16 px keep every pooling grid
from .vgg import LAYERS, layer_channels, layer_stride



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


def _all_tiles(tiles: list[Tile]) -> list[Tile]:
    return tiles


class TiledFeatures:
    """How targets see an image, tile by tile (objective.Features' tiled twin): whole feature maps
    assembled from tile interiors, Grams summed over them.  ``share`` picks this process's tiles
    and ``reduce`` sums a tensor over processes in place (distributed.py)."""

    def __init__(self, network, ops, tile: int, halo: int | None = None, autocast=contextlib.nullcontext,
                 share: Callable[[list[Tile]], list[Tile]] = _all_tiles,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduce):
        self.network, self.ops, self.autocast = network, ops, autocast
        self.tile = int(tile)
        self.halo = exact_halo(network.layers) if halo is None else int(halo)
        self.share, self.reduce = share, reduce
        self.strides = {slot: layer_stride(name) for slot, name in enumerate(network.layers)}

    def grid(self, image: torch.Tensor) -> list[Tile]:
        return tile_grid(image.shape[-2], image.shape[-1], self.tile, self.halo)

    def channels(self, slot: int) -> int:
        return layer_channels(self.network.layers[slot])

    def maps(self, image: torch.Tensor, slots: Sequence[int]) -> list[torch.Tensor]:
        height, width = image.shape[-2:]
        # fp32 whatever the network's precision: a full-size map assembled across processes must
        # survive all_reduce on every backend (gloo has no bf16 sum).
        maps = [image.new_zeros((1, self.channels(s), height // self.strides[s], width // self.strides[s]),
                                dtype=torch.float32) for s in slots]
        for tile in self.share(self.grid(image)):
            with torch.no_grad(), self.autocast():
                features = self.network(_crop(image, tile))
            y0, y1, x0, x1 = tile.interior
            for target, slot in zip(maps, slots):
                stride = self.strides[slot]
                target[:, :, y0 // stride:y1 // stride, x0 // stride:x1 // stride] = \
                    _interior(features[slot], tile, stride)
        for target in maps:
            self.reduce(target)  # interiors are disjoint: the sum assembles the whole map
        return maps

    def summed_grams(self, image: torch.Tensor, slots: Sequence[int]) -> list[torch.Tensor]:
        """The whole image's Gram at each slot: interior Grams summed over (all ranks') tiles."""
        grams = [image.new_zeros((self.channels(s), self.channels(s)), dtype=torch.float32) for s in slots]
        for tile in self.share(self.grid(image)):
            with torch.no_grad(), self.autocast():
                features = self.network(_crop(image, tile))
            for gram, slot in zip(grams, slots):
                gram += self.ops.gram(_interior(features[slot], tile, self.strides[slot]))[0]
        for gram in grams:
            self.reduce(gram)
        return grams

    def grams(self, image: torch.Tensor, slots: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        height, width = image.shape[-2:]
        return [(gram, (height // self.strides[s]) * (width // self.strides[s]))
                for gram, s in zip(self.summed_grams(image, slots), slots)]


class Tiler:
    """The objective's loss and gradient, computed tile by tile over the objective's own targets.

    ``objective`` (objective.StyleObjective) holds the targets and weights, computed through
    ``features``.  Pass 1 sums the Grams of the tile interiors: the whole image's G_l, hence D_l and
    the style loss.  Pass 2 runs each tile forward and backward on the surrogate of the module
    docstring and adds its input gradient into the full-image gradient.  One image (B = 1).
    """

    def __init__(self, objective, features: TiledFeatures, height: int, width: int):
        self.objective, self.features = objective, features
        self.tiles = tile_grid(height, width, features.tile, features.halo)

    def loss_and_grad(self, image: torch.Tensor, scale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss as (1,) fp32, its gradient with respect to ``image`` (fp32), times ``scale``
        when given (fp16 loss scaling))."""
        objective, features = self.objective, self.features
        image = image.detach()
        height, width = image.shape[-2:]
        grams = features.summed_grams(image, objective.style_slots)  # pass 1
        diffs, style_loss = [], image.new_zeros((), dtype=torch.float32)
        for gram, target, weight, slot in zip(grams, objective.style_targets, objective.style_layer_weights,
                                              objective.style_slots):
            stride = features.strides[slot]
            s = style_normaliser(gram.shape[0], (height // stride) * (width // stride))
            diff = gram - target
            style_loss = style_loss + diff.square().sum() * (objective.beta * weight * s)
            diffs.append(diff * (2.0 * s * objective.beta * weight))  # the surrogate's constant factor
        grad = torch.zeros_like(image, dtype=torch.float32)
        content_loss = image.new_zeros((), dtype=torch.float32)
        for tile in features.share(self.tiles):  # pass 2
            piece = _crop(image, tile).clone().requires_grad_(True)
            with features.autocast():
                maps = objective.network(piece)
            content_part = piece.new_zeros((), dtype=torch.float32)
            y0, y1, x0, x1 = tile.interior
            for slot, target, v in zip(objective.content_slots, objective.content_targets,
                                       objective.content_layer_weights):
                stride = features.strides[slot]
                p = target[:, :, y0 // stride:y1 // stride, x0 // stride:x1 // stride]
                content_part = content_part + objective.ops.content_loss(
                    _interior(maps[slot], tile, stride), p) * (objective.alpha * v)
            surrogate = content_part
            for slot, diff in zip(objective.style_slots, diffs):
                f = _interior(maps[slot], tile, features.strides[slot])
                surrogate = surrogate + (objective.ops.gram(f)[0] * diff).sum()
            (piece_grad,) = torch.autograd.grad(surrogate if scale is None else surrogate * scale, piece)
            ry0, ry1, rx0, rx1 = tile.region
            grad[:, :, ry0:ry1, rx0:rx1] += piece_grad.float()
            content_loss = content_loss + content_part.detach()
        features.reduce(grad)
        features.reduce(content_loss)
        loss = content_loss + style_loss
        if objective.has_image_terms:  # TV and temporal terms act on the whole image
            whole = image.clone().requires_grad_(True)
            terms = objective.image_terms(whole).sum()
            (terms_grad,) = torch.autograd.grad(terms * scale if scale is not None else terms, whole)
            grad += terms_grad
            loss = loss + terms.detach()
        return loss.reshape(1), grad

