"""The context the PyTorch twins compute their products in: autocast switched off.

Autocast would cast the operands of ``@`` down to 16 bits (an fp16 Gram of conv1_1 overflows; the
mean-covariance loss's Newton-Schulz products lose their accuracy), unlike the Triton kernels,
which accumulate in fp32 whatever the inputs.
"""

from __future__ import annotations

import contextlib

import torch


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which x's device runs no autocast (a no-op where none is active)."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
