"""The fused style losses, weight / (4 C^2 M^2) sum (G_b - A)^2 per sample, as torch.autograd.Functions.

Forward is one Gram launch whose epilogue forms D = G - A and each sample's loss (triton_gram.py); D
is kept for backward, which is one launch of the D F product: grad_x[b] = grad_out[b] * weight /
(C^2 M^2) * D_b F_b, in x's dtype and layout.  grad_out stays on the device (no host read), so the
step can be captured in a CUDA graph.  ``grouped_style_losses`` does the same for all style layers
at once: one forward launch (and one memset) and one backward launch instead of three per layer.
"""

from __future__ import annotations

import sys

import torch

from ..errors import first_line
from .reference import style_normaliser
from .triton_gram import (as_bcm, launch_gram, launch_gram_backward, launch_grouped_gram_backward,
                          launch_grouped_style_losses)


class StyleLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, target_gram: torch.Tensor, weight: float) -> torch.Tensor:
        _, channels, positions, _ = as_bcm(x)
        scale = weight * style_normaliser(channels, positions)
        d, losses = launch_gram(x, target_gram, loss_scale=scale)
        ctx.save_for_backward(x, d)
        ctx.grad_scale = 4.0 * scale  # weight / (C^2 M^2)
        return losses

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, d = ctx.saved_tensors
        per_sample = grad_out.float().reshape(-1).contiguous()
        return launch_gram_backward(d, x, scale=ctx.grad_scale, scale_tensor=per_sample), None, None


def style_losses(x: torch.Tensor, target_gram: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Fused Triton style losses; A is (C, C) or (B, C, C); returns (B,) fp32."""
    if target_gram.requires_grad and torch.is_grad_enabled():
        raise ValueError("the Triton style loss does not differentiate with respect to the target "
                         "Gram; detach it or use the torch backend")
    return StyleLosses.apply(x, target_gram, float(weight))


def style_loss(x: torch.Tensor, target_gram: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The style losses summed over the batch: an fp32 scalar."""
    return style_losses(x, target_gram, weight).sum()


class GroupedStyleLosses(torch.autograd.Function):
    """The style losses of L layers, (L, B), from one forward and one backward launch.

    ``apply(layers, fallback, *features, *targets)``: with ``fallback`` a failure of the grouped
    backward launch on its first use is said once on stderr and the gradient comes from one launch
    per layer (``grouped_style_losses``); without it (the GPU check, the cross-compile) it raises."""

    @staticmethod
    def forward(ctx, layers: int, fallback: bool, *features_and_targets: torch.Tensor) -> torch.Tensor:
        xs, targets = features_and_targets[:layers], features_and_targets[layers:]
        scales = [style_normaliser(*as_bcm(x)[1:3]) for x in xs]
        ds, losses = launch_grouped_style_losses(list(xs), list(targets), scales)
        ctx.save_for_backward(*xs, *ds)
        ctx.layers, ctx.fallback, ctx.grad_scales = layers, fallback, [4.0 * scale for scale in scales]  # 1/(C^2 M^2)
        return losses

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = ctx.saved_tensors
        xs, ds = saved[:ctx.layers], saved[ctx.layers:]
        scale_tensor = grad_out.float().contiguous()
        if ctx.fallback and _grouped_works["backward"] is False:
            grads = _per_layer_backward(ds, xs, ctx.grad_scales, scale_tensor)
        else:
            try:
                grads = launch_grouped_gram_backward(list(ds), list(xs), ctx.grad_scales, scale_tensor)
            except Exception as exc:
                if not ctx.fallback or _grouped_works["backward"]:  # it ran before: a real error
                    raise
                _unavailable("backward", exc)
                grads = _per_layer_backward(ds, xs, ctx.grad_scales, scale_tensor)
            else:
                _grouped_works["backward"] = True
        return (None, None, *grads) + (None,) * ctx.layers


def _per_layer_backward(ds, xs, grad_scales, scale_tensor: torch.Tensor) -> list[torch.Tensor]:
    """The grouped backward's gradients from one launch per layer (the same numbers)."""
    return [launch_gram_backward(d, x, scale=scale, scale_tensor=scale_tensor[layer].contiguous())
            for layer, (d, x, scale) in enumerate(zip(ds, xs, grad_scales))]


# Per direction: None until the grouped kernel first runs, True once it has, False once it failed
# to compile or launch here (then every later call takes one launch per layer in both directions).
_grouped_works: dict[str, bool | None] = {"forward": None, "backward": None}


def _unavailable(direction: str, exc: Exception) -> None:
    """Remember that the grouped kernels cannot run here, and say so once on stderr."""
    warned = False in _grouped_works.values()
    _grouped_works[direction] = False
    if not warned:
        print(f"fastnst: warning: grouped style-loss kernels unavailable ({direction}: {first_line(exc)}); "
              f"one launch per layer", file=sys.stderr)


def grouped_style_losses(xs: list[torch.Tensor], target_grams: list[torch.Tensor]) -> torch.Tensor:
    """Fused Triton style losses of L layers in one launch each way: (L, B) fp32, row l being
    ``style_losses(xs[l], target_grams[l])``.

    The grouped kernels pass per-layer arguments as tuples, which an older Triton may not compile.
    If the first use of either direction in this process fails, that is said once on stderr and
    that call, and every later one, takes one launch per layer (the same numbers, more launches),
    so a run is never lost to it.  ``GroupedStyleLosses.apply`` with ``fallback=False`` raises instead."""
    if torch.is_grad_enabled() and any(target.requires_grad for target in target_grams):
        raise ValueError("the Triton style loss does not differentiate with respect to the target "
                         "Gram; detach it or use the torch backend")
    if False in _grouped_works.values():
        return torch.stack([style_losses(x, target) for x, target in zip(xs, target_grams)])
    try:
        losses = GroupedStyleLosses.apply(len(xs), True, *xs, *target_grams)
    except Exception as exc:
        if _grouped_works["forward"]:  # it ran before: this is a real error, not a missing Triton feature
            raise
        _unavailable("forward", exc)
        return grouped_style_losses(xs, target_grams)
    _grouped_works["forward"] = True
    return losses
