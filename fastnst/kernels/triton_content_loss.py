"""Triton content loss 1/2 sum (F - P)^2: one read of F and P forward, one read and one write back.

Both kernels treat F and P as flat arrays in storage order, which is right whenever the two share
a dense layout (contiguous or channels_last, as features of the same network do); other pairs are
made contiguous first.  Forward writes one fp32 partial sum per program, summed afterwards in a
fixed order, so the loss is deterministic.  One grid axis, with int64 offsets: conv1_1 of a
16384 px image has 2^34 elements, 2^24 programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_gram

BLOCK = 1024  # elements per program: 4 KiB of fp32 per operand, enough to hide latency


@triton.jit
def _content_forward_kernel(x_ptr, t_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    """partial[pid] = sum over this program's block of (x - t)^2, in fp32."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    diff = x - t
    tl.store(partial_ptr + pid, tl.sum(diff * diff, axis=0))


@triton.jit
def _content_backward_kernel(x_ptr, t_ptr, grad_out_ptr, grad_ptr, n, BLOCK: tl.constexpr):
    """grad = grad_out * (x - t), in the gradient's dtype."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(grad_out_ptr)
    tl.store(grad_ptr + offs, (scale * (x - t)).to(grad_ptr.dtype.element_ty), mask=inside)


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _same_dense_layout(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != target.shape:
        raise ValueError(f"content target has shape {tuple(target.shape)}, features {tuple(x.shape)}")
    if _dense(x) and x.stride() == target.stride():
        return x, target
    return x.contiguous(), target.contiguous()


class ContentLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, target = _same_dense_layout(x, target)
        n = x.numel()
        grid = triton_gram.grid_1d(triton.cdiv(n, BLOCK), "the content-loss kernel")
        partial = triton_gram.new_output(grid, torch.float32, x.device)
        _content_forward_kernel[grid](x, target, partial, n, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(x, target)
        return partial.sum() * 0.5

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, target = ctx.saved_tensors
        n = x.numel()
        grad = triton_gram.new_like(x)
        _content_backward_kernel[triton_gram.grid_1d(triton.cdiv(n, BLOCK), "the content-loss kernel")](
            x, target, grad_out.float().reshape(1), grad, n, BLOCK=BLOCK, num_warps=4)
        return grad, None


def content_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/2 sum (F - P)^2 with the Triton kernels; an fp32 scalar."""
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError("the Triton content loss does not differentiate with respect to the target; "
                         "detach it or use the torch backend")
    return ContentLoss.apply(x, target)
