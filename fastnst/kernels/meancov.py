"""The mean-covariance style loss: the Wasserstein-2 distance between Gaussians fitted to features.

For one sample's features F (C x M) at a layer: the mean mu = F 1 / M and the covariance
Sigma = F F^T / M - mu mu^T + eps I, a centred Gram, so its expensive part, F F^T, is the
backend's Gram kernel (Triton on CUDA).  Against a target (mu_t, Sigma_t), per channel:

    W_l = ( |mu - mu_t|^2 + tr Sigma + tr Sigma_t - 2 tr (Sigma_t^1/2 Sigma Sigma_t^1/2)^1/2 ) / C

(the squared W2 distance between N(mu, Sigma) and N(mu_t, Sigma_t), as style-transfer-pytorch
uses it).  The square root of the C x C product is taken by a fixed number of coupled
Newton-Schulz iterations: matrix products only, no eigendecomposition and nothing read back, so the
step stays capturable in a CUDA graph; the same iteration's inverse square root gives the gradient
of the trace term (``_TraceSqrt``).  The target's own square root is computed once, exactly
(eigendecomposition in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference
from .full_precision import full_precision

# Added to both covariances' diagonals (as style-transfer-pytorch does): a rank-deficient
# covariance (fewer positions than channels at conv5_1 of a small image) has a square root whose
# derivative is unbounded at zero eigenvalues.
COVARIANCE_EPS = 1e-4
# Coupled Newton-Schulz converges quadratically once an eigenvalue of A / |A|_F is near 1, but an
# eigenvalue r far below it first grows only ~1.5x per iteration: after k iterations the square
# root is accurate for r above ~1.5^(-2k).  16 iterations reach r ~ 2e-6 of the largest; what is
# below contributes at most sqrt(r) |A|_F^(1/2) per eigenvalue to the trace (tests/test_meancov.py).
NEWTON_SCHULZ_ITERATIONS = 16


@dataclass
class MeanCovTarget:
    """A layer's target: mean (C,) or (B, C), the covariance's square root (C, C) or (B, C, C)
    and its trace () or (B,)."""

    mean: torch.Tensor
    cov_sqrt: torch.Tensor
    cov_trace: torch.Tensor

    @staticmethod
    def from_moments(mean: torch.Tensor, second_moment: torch.Tensor) -> "MeanCovTarget":
        """The target of features with this mean and second raw moment F F^T / M (the two statistics
        that blend linearly over several style images, unlike the covariance)."""
        wide = torch.float64
        cov = second_moment.to(wide) - mean.to(wide)[..., :, None] * mean.to(wide)[..., None, :]
        cov = 0.5 * (cov + cov.transpose(-1, -2)) + COVARIANCE_EPS * torch.eye(cov.shape[-1], dtype=wide,
                                                                                 device=cov.device)
        values, vectors = torch.linalg.eigh(cov)
        root = (vectors * values.clamp(min=0).sqrt()[..., None, :]) @ vectors.transpose(-1, -2)
        dtype = second_moment.dtype
        return MeanCovTarget(mean=mean.to(dtype), cov_sqrt=root.to(dtype),
                             cov_trace=cov.diagonal(dim1=-2, dim2=-1).sum(-1).to(dtype))

    @staticmethod
    def stack(targets: list["MeanCovTarget"]) -> "MeanCovTarget":
        """Per-sample targets (one per sample of a batch) as one batched target."""
        return MeanCovTarget(*(torch.stack([getattr(t, name) for t in targets])
                               for name in ("mean", "cov_sqrt", "cov_trace")))


def _newton_schulz(a: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^(1/2), A^(-1/2)) of symmetric positive (semi)definite matrices (..., C, C) by the coupled
    Newton-Schulz iteration Y <- Y T, Z <- T Z, T = (3 I - Z Y) / 2 from Y = A / |A|_F, Z = I,
    which converges to ((A / |A|_F)^(1/2), (A / |A|_F)^(-1/2)) for eigenvalues in (0, 1]."""
    norm = torch.linalg.matrix_norm(a).clamp(min=torch.finfo(a.dtype).tiny)[..., None, None]
    identity = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    y, z = a / norm, identity
    for _ in range(iterations):
        t = 0.5 * (3.0 * identity - z @ y)
        y, z = y @ t, t @ z
    return y * norm.sqrt(), z / norm.sqrt()


def sqrtm_newton_schulz(a: torch.Tensor, iterations: int = NEWTON_SCHULZ_ITERATIONS) -> torch.Tensor:
    """The square root of symmetric positive (semi)definite matrices (..., C, C) (``_newton_schulz``)."""
    return _newton_schulz(a, iterations)[0]


class _TraceSqrt(torch.autograd.Function):
    """tr(A^(1/2)) of symmetric positive definite (B, C, C), with the gradient written out:
    d tr(A^(1/2)) / dA = A^(-1/2) / 2, whose Newton-Schulz estimate the forward pass already holds
    (the Z iterate).  Backpropagating through the 16 iterations instead stored all of them and cost
    twice the forward's products (measured on the CPU at 256 px: 0.75 s of extra step time)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, iterations: int) -> torch.Tensor:
        root, inverse_root = _newton_schulz(a, iterations)
        ctx.save_for_backward(inverse_root)
        return root.diagonal(dim1=-2, dim2=-1).sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse_root,) = ctx.saved_tensors
        half = 0.25 * (inverse_root + inverse_root.transpose(-1, -2))  # symmetric, as A is
        return grad[:, None, None] * half, None


def meancov_losses(x: torch.Tensor, target: MeanCovTarget,
                   gram: Callable[[torch.Tensor], torch.Tensor] = reference.gram,
                   iterations: int = NEWTON_SCHULZ_ITERATIONS) -> torch.Tensor:
    """(B,) W_l of features ``x`` (B, C, H, W) or (B, C, M) against ``target`` (shared, or one per
    sample); ``gram`` the backend's differentiable F F^T (B, C, C), fp32 under any autocast (by
    default the PyTorch twin's: this is then the CPU path and the oracle)."""
    channels, positions = x.shape[1], x[0, 0].numel()
    second_moment = gram(x) / positions  # fp32 (fp64 for fp64 features)
    with full_precision(x):
        wide = second_moment.dtype
        mean = x.flatten(2).to(wide).mean(2)
        cov = second_moment - mean[:, :, None] * mean[:, None, :]
        cov = cov + COVARIANCE_EPS * torch.eye(channels, dtype=wide, device=x.device)
        root = target.cov_sqrt.to(wide)
        cross_trace = _TraceSqrt.apply(root @ cov @ root, iterations)
        mean_term = (mean - target.mean.to(wide)).square().sum(1)
        trace = cov.diagonal(dim1=1, dim2=2).sum(1)
        return (mean_term + trace + target.cov_trace.to(wide) - 2.0 * cross_trace) / channels
