"""Triton content losses 1/2 sum (F - P)^2 per sample: one read of F and P forward, one read and one
write back.

Both kernels treat each sample of F and P as a flat array in storage order, which is right whenever
the two share a dense layout with the batch outermost (contiguous or channels_last, as features of
the same network are); other pairs are made contiguous first.  Forward writes one fp32 partial sum
per program, summed afterwards in a fixed order, so the losses are deterministic.  One grid axis,
with int64 offsets: conv1_1 of a 16384 px image has 2^34 elements, 2^24 programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_gram

BLOCK = 1024  # elements per program: 4 KiB of fp32 per operand, enough to hide latency


@triton.jit
def _content_forward_kernel(x_ptr, t_ptr, partial_ptr, per_sample, blocks, BLOCK: tl.constexpr):
    """partial[pid] = sum over this program's block of (x - t)^2, in fp32; pid = b * blocks + block."""
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    within = (pid % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = within < per_sample
    offs = b * per_sample + within
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    diff = x - t
    tl.store(partial_ptr + pid, tl.sum(diff * diff, axis=0))


@triton.jit
def _content_backward_kernel(x_ptr, t_ptr, grad_out_ptr, grad_ptr, per_sample, blocks, BLOCK: tl.constexpr):
    """grad = grad_out[b] * (x - t) for the samples b, in the gradient's dtype."""
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    within = (pid % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = within < per_sample
    offs = b * per_sample + within
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(grad_out_ptr + b)
    tl.store(grad_ptr + offs, (scale * (x - t)).to(grad_ptr.dtype.element_ty), mask=inside)


def _batch_outermost(x: torch.Tensor) -> bool:
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return dense and (x.shape[0] <= 1 or x.stride(0) * x.shape[0] == x.numel())


def _same_dense_layout(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != target.shape:
        raise ValueError(f"content target has shape {tuple(target.shape)}, features {tuple(x.shape)}")
    if _batch_outermost(x) and x.stride() == target.stride():
        return x, target
    return x.contiguous(), target.contiguous()


def _grid(x: torch.Tensor) -> tuple[tuple[int], int, int]:
    """(grid, elements per sample, programs per sample)."""
    per_sample = x.numel() // max(x.shape[0], 1)
    blocks = max(1, triton.cdiv(per_sample, BLOCK))
    return triton_gram.grid_1d(x.shape[0] * blocks, "the content-loss kernel"), per_sample, blocks


class ContentLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, target = _same_dense_layout(x, target)
        grid, per_sample, blocks = _grid(x)
        partial = triton_gram.new_output(grid, torch.float32, x.device)
        _content_forward_kernel[grid](x, target, partial, per_sample, blocks, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(x, target)
        return partial[: x.shape[0] * blocks].view(x.shape[0], blocks).sum(dim=1) * 0.5

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, target = ctx.saved_tensors
        grad = triton_gram.new_like(x)
        grid, per_sample, blocks = _grid(x)
        _content_backward_kernel[grid](x, target, grad_out.float().reshape(-1).contiguous(), grad, per_sample,
                                       blocks, BLOCK=BLOCK, num_warps=4)
        return grad, None


def content_losses(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/2 sum (F - P)^2 of each sample with the Triton kernels: (B,) fp32."""
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError("the Triton content loss does not differentiate with respect to the target; "
                         "detach it or use the torch backend")
    return ContentLosses.apply(x, target)


def content_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The content losses summed over the batch: an fp32 scalar."""
    return content_losses(x, target).sum()
