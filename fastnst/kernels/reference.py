"""Pure-PyTorch Gram matrix, content loss and style loss, exactly as DESIGN.md writes them.

These are the CPU path and the oracle the Triton kernels are tested against.  Inputs may be
bf16/fp16; everything is accumulated and returned in fp32 (fp64 inputs stay fp64, which is what
gradcheck needs).
"""

from __future__ import annotations

import torch


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
    """G = F F^T per batch element, unnormalised: (B, C, C) fp32."""
    f = _flat(x)
    return f @ f.transpose(1, 2)


def style_loss(x: torch.Tensor, target_gram: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """sum_b weight / (4 C^2 M^2) * sum (G_b - A)^2; A is (C, C) or (B, C, C)."""
    f = _flat(x)
    channels, positions = f.shape[1], f.shape[2]
    diff = gram(f) - _wide(target_gram)
    # The scale is formed in Python (double): 4 C^2 M^2 passes 1e15 at 512 px and would lose
    # digits if formed in fp32 first.
    return diff.square().sum() * (weight / (4.0 * channels**2 * positions**2))


def content_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/2 sum (F - P)^2."""
    return 0.5 * (_wide(x) - _wide(target)).square().sum()
