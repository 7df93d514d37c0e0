"""The hot math of the objective, one op per file.

    reference.py            pure-PyTorch Gram / style losses / content losses: CPU path and oracle
    triton_gram.py          Triton symmetric Gram kernel (+ the D F product of the gradients)
    triton_style_loss.py    fused Triton style losses forward/backward (autograd.Function)
    triton_content_loss.py  fused Triton content losses forward/backward (autograd.Function)
    backend.py              auto | torch | triton: which of them runs (``ops``)

The Triton files carry a prefix because a submodule named ``gram`` would replace the function
``kernels.gram`` on the package the moment it is imported.  ``gram`` dispatches on the backend in
force (``set_backend``, $FASTNST_BACKEND, auto) and the tensor's device; a run resolves its kernels
once, with ``ops``.
"""

from __future__ import annotations

import torch

from .backend import BACKENDS, get_backend, interpreting, ops, resolve, set_backend


def gram(x: torch.Tensor) -> torch.Tensor:
    """(B, C, C) fp32 F F^T of (B, C, H, W) or (B, C, M) features."""
    return ops(x.device).gram(x)


__all__ = ["BACKENDS", "get_backend", "gram", "interpreting", "ops", "resolve", "set_backend"]
