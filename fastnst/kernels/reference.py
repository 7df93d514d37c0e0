"""Pure-PyTorch Gram matrix, content loss and style loss, exactly as DESIGN.md writes them.

These are the CPU path and the oracle the Triton kernels are tested against.  Inputs may be
bf16/fp16; everything is accumulated and returned in fp32 (fp64 inputs stay fp64, which is what
gradcheck needs).  That holds under autocast too: autocast would cast the operands of ``@`` back
down to 16 bits (a bf16 G of conv1_1 features is off by ~4e-3; an fp16 one overflows, G ~ M F^2),
so the products here run with autocast switched off, as the Triton kernels do.
"""

from __future__ import annotations

import torch

from .full_precision import full_precision


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C, M) -> (B, C, M) in fp32 (fp64 kept)."""
    if x.dim() == 4:
        x = x.flatten(2)
    if x.dim() != 3:
        raise ValueError(f"features must have shape (B, C, H, W) or (B, C, M), not {tuple(x.shape)}")
    return _wide(x)


def gram(x: torch.Tensor) -> torch.Tensor:
    """G = F F^T per batch element, unnormalised: (B, C, C) fp32, whatever autocast is on."""
    f = _flat(x)
    with full_precision(f):
        return f @ f.transpose(1, 2)


def style_normaliser(channels: int, positions: int) -> float:
    """1 / (4 C^2 M^2), the normalisation of E_l (DESIGN.md): the one place it is written.

    Formed in Python (double): 4 C^2 M^2 passes 1e15 at 512 px and would lose digits in fp32."""
    return 1.0 / (4.0 * channels**2 * positions**2)


class _StyleLosses(torch.autograd.Function):
    """Per-sample style losses with their gradient written out: 2 s (D + D^T) F, s = w / (4 C^2 M^2).

    Autograd through G = F F^T would form grad_G F and grad_G^T F, two (C x C) @ (C x M) products;
    D + D^T first needs one, halving the backward's matmul work (on the CPU at 256 px that was
    47 of the 300 ms of a step).  For a symmetric A (a Gram) it is DESIGN.md's (G - A) F / (C^2 M^2).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, target_gram: torch.Tensor, weight: float) -> torch.Tensor:
        f = _flat(x)
        with full_precision(f):
            diff = f @ f.transpose(1, 2) - _wide(target_gram)
        ctx.save_for_backward(x, diff)
        ctx.scale = weight * style_normaliser(f.shape[1], f.shape[2])
        return diff.square().sum(dim=(1, 2)) * ctx.scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, diff = ctx.saved_tensors
        with full_precision(diff):
            symmetric = (diff + diff.transpose(1, 2)) * (2.0 * ctx.scale) * grad_out.view(-1, 1, 1)
            if x.dtype == torch.bfloat16:
                # As the Triton kernel does: D rounded to bf16 (fp32's exponent range), products
                # accumulated in fp32, the gradient written in bf16 as it would be anyway.  Half the
                # bytes and native bf16 products on CPUs that have them.
                grad = (symmetric.to(x.dtype) @ x.flatten(2)).view(x.shape)
            else:  # fp16 keeps the fp32 product: D ~ M F^2 overflows fp16's range
                grad = (symmetric @ _flat(x)).view(x.shape).to(x.dtype)
        return grad, None, None


def style_losses(x: torch.Tensor, target_gram: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """(B,) fp32: weight / (4 C^2 M^2) * sum (G_b - A)^2 of each sample; A is (C, C) or (B, C, C).

    Differentiable with respect to x only (targets are constants, computed under no_grad)."""
    _flat(x)  # shape check before autograd sees it
    if target_gram.requires_grad and torch.is_grad_enabled():
        raise ValueError("the style loss does not differentiate with respect to the target Gram")
    return _StyleLosses.apply(x, target_gram, float(weight))


def style_loss(x: torch.Tensor, target_gram: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The style losses summed over the batch: an fp32 scalar."""
    return style_losses(x, target_gram, weight).sum()


def grouped_style_losses(xs: list[torch.Tensor], target_grams: list[torch.Tensor]) -> torch.Tensor:
    """(L, B) fp32: the style losses of L layers at once (row l is ``style_losses(xs[l],
    target_grams[l])``); the Triton twin computes them in one launch."""
    return torch.stack([style_losses(x, target) for x, target in zip(xs, target_grams)])


def content_losses(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) fp32: 1/2 sum (F - P)^2 of each sample, whatever autocast is on."""
    with full_precision(x):
        return 0.5 * (_wide(x) - _wide(target)).square().flatten(1).sum(dim=1)


def content_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The content losses summed over the batch: an fp32 scalar."""
    return content_losses(x, target).sum()
