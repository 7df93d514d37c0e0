"""The hot math of the objective, one op per file.

    reference.py            pure-PyTorch Gram / style loss / content loss: CPU path and oracle
    triton_gram.py          Triton symmetric Gram kernel (+ the D F product of the gradients)
    triton_style_loss.py    fused Triton style loss forward/backward (autograd.Function)
    triton_content_loss.py  fused Triton content loss forward/backward (autograd.Function)
    backend.py              auto | torch | triton: which of them runs

The Triton files carry a prefix because a submodule named ``gram`` would replace the function
``kernels.gram`` on the package the moment it is imported.

The functions below dispatch on the backend in force (``set_backend``, $FASTNST_BACKEND, auto)
and the tensor's device.  The objective resolves its backend once per run with ``ops``.
"""

from __future__ import annotations

import torch

from .backend import BACKENDS, get_backend, interpreting, ops, resolve, set_backend


def gram(x: torch.Tensor) -> torch.Tensor:
    """(B, C, C) fp32 F F^T of (B, C, H, W) or (B, C, M) features."""
    return ops(x.device).gram(x)


def style_loss(x: torch.Tensor, target_gram: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """fp32 scalar sum_b weight / (4 C^2 M^2) sum (G_b - A)^2."""
    return ops(x.device).style_loss(x, target_gram, weight)


def content_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """fp32 scalar 1/2 sum (F - P)^2."""
    return ops(x.device).content_loss(x, target)


__all__ = ["BACKENDS", "content_loss", "get_backend", "gram", "interpreting", "ops", "resolve",
           "set_backend", "style_loss"]
