"""The textbook baseline: Gatys et al. written plainly, the way the official PyTorch tutorial does.

fp32, eager, NCHW; ``nn.Module`` loss layers inserted into a VGG19 ``nn.Sequential``; the loss
modules store their loss on the side; ``torch.optim.LBFGS`` (or Adam) drives a closure that clamps
the image into [0, 1], as the tutorial's does.  No fused kernels, no mixed precision, no graphs.

It computes fastnst's default objective: the tutorial's losses (MSE of features; MSE of Grams
divided by N*M) with its weights (style 1e6, content 1) on fastnst's layers and VGG weights, which
is exactly what the default StyleConfig means (docs/objective.md).  ``fastnst bench`` times
it next to the fast path; ``benchmarks/reference_gatys.py`` runs it on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg19

from .vgg import IMAGENET_MEAN, IMAGENET_STD, layer_info

STYLE_WEIGHT = 1e6  # the tutorial's
CONTENT_WEIGHT = 1.0


class Normalization(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(-1, 1, 1))

    def forward(self, img):
        return (img - self.mean) / self.std


class ContentLoss(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target = target.detach()
        self.loss = None

    def forward(self, input):
        self.loss = F.mse_loss(input, self.target)
        return input


def gram_matrix(input):
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class StyleLoss(nn.Module):
    def __init__(self, target_feature):
        super().__init__()
        self.target = gram_matrix(target_feature).detach()
        self.loss = None

    def forward(self, input):
        G = gram_matrix(input)
        self.loss = F.mse_loss(G, self.target)
        return input


def build_model(state_dict: Mapping[str, torch.Tensor], content_img, style_img,
                content_layers: Sequence[str], style_layers: Sequence[str], pooling: str = "max"):
    """VGG19 with loss modules after the named layers (post-ReLU), cut after the last loss."""
    cnn = vgg19(weights=None).features
    cnn.load_state_dict(state_dict)
    cnn = cnn.to(content_img.device).eval()
    content_at = {layer_info(name)[0] for name in content_layers}
    style_at = {layer_info(name)[0] for name in style_layers}
    model = nn.Sequential()
    model.add_module("normalization", Normalization().to(content_img.device))
    content_losses, style_losses = [], []
    for index, layer in enumerate(cnn):
        if isinstance(layer, nn.ReLU):
            layer = nn.ReLU(inplace=False)  # in-place ReLUs clash with the inserted loss modules
        elif isinstance(layer, nn.MaxPool2d) and pooling == "avg":
            layer = nn.AvgPool2d(kernel_size=2, stride=2)
        model.add_module(f"vgg_{index}", layer)
        if index in content_at:
            target = model(content_img).detach()
            content_loss = ContentLoss(target)
            model.add_module(f"content_loss_{index}", content_loss)
            content_losses.append(content_loss)
        if index in style_at:
            target_feature = model(style_img).detach()
            style_loss = StyleLoss(target_feature)
            model.add_module(f"style_loss_{index}", style_loss)
            style_losses.append(style_loss)
        if index >= max(content_at | style_at):
            break
    model.requires_grad_(False)
    return model, style_losses, content_losses


def total_loss(model, style_losses, content_losses, input_img):
    model(input_img)
    style_score = sum(sl.loss for sl in style_losses)
    content_score = sum(cl.loss for cl in content_losses)
    return STYLE_WEIGHT * style_score + CONTENT_WEIGHT * content_score


def make_optimizer(name: str, input_img, lr: float | None = None):
    if name == "lbfgs":
        # max_iter=1: one .step() is one evaluation and one update, the unit fastnst counts.
        return torch.optim.LBFGS([input_img], lr=lr or 1.0, max_iter=1)
    return torch.optim.Adam([input_img], lr=lr or 0.02)


def make_step(model, style_losses, content_losses, input_img, optimizer):
    """One iteration as the tutorial writes it: clamp, zero_grad, forward, backward, step."""

    def closure():
        with torch.no_grad():
            input_img.clamp_(0, 1)
        optimizer.zero_grad()
        loss = total_loss(model, style_losses, content_losses, input_img)
        loss.backward()
        return loss

    def step():
        return optimizer.step(closure)

    return step
