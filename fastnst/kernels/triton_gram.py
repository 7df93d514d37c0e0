"""Triton Gram matrix G = F F^T as a symmetric rank-k update, and the product D F its gradients need.

Features F are read as (B, C, M) in their stored layout: element (b, c, m) lives at
b*stride_b + c*stride_c + m*stride_m, which covers contiguous NCHW (stride_m = 1) and
channels_last (stride_c = 1, stride_m = C) without a copy.

``_gram_kernel`` computes only the output tiles on or above the diagonal (half the FLOPs of a
matmul) and writes each one twice, directly and mirrored.  When C is small (conv1_1: C = 64, one
tile) the long M axis is split over programs so the GPU fills up: each program adds its partial
tile into a zeroed fp32 workspace with atomics and bumps a per-tile counter; the last program to
arrive owns the finished tile and runs the epilogue.  The epilogue writes G, or, for the style
loss, D = G - A and the tile's share of sum (G - A)^2, so the loss needs no second pass over G.
With atomics the summation order varies between runs (results agree to fp32 rounding).

``_gram_backward_kernel`` computes scale * D F (the Gram's and the style loss's gradient with
respect to F) and writes it in the layout of the gradient tensor.

``_grouped_gram_kernel`` and ``_grouped_gram_backward_kernel`` do the same for several layers in
one launch each (the style losses of all style layers: 2 launches and 1 memset per step instead of
3 per layer).  Each layer's programs take a contiguous range of the one grid axis; a program finds
its layer by comparing its index with the ranges' starts, which it works out from the layers' sizes
(unrolled over the layers at compile time with ``tl.static_range``; per-layer pointers and sizes
arrive as tuples, whose integers Triton specialises, so no argument depends on the split), and runs the same
``_gram_program`` / ``_gram_backward_program`` as the one-layer kernels.  Besides the launches
saved, the deep layers' few tiles (conv5_1 at 512 px: 36 tile programs) now share the GPU with
conv1_1's many instead of running alone.

Every launch uses a one-dimensional grid.  CUDA allows 2^31 - 1 programs on grid axis 0 but only
65,535 on axes 1 and 2; the number of position blocks of conv1_1 reaches 65,536 at 2048 x 2048
px, so all work indices (batch, channel block, position block, split part) are folded into axis 0
and unfolded in the kernel.  ``grid_1d`` refuses a launch that would not fit (never reached by
the shapes VGG19 produces: tests/test_launch_grids.py walks every layer up to 16384 px).

With ``torch.use_deterministic_algorithms(True)`` the Gram is not split over programs (one
program sums each tile in a fixed order), so G, D and the gradients are the same bits on every
run; only the loss's cross-tile sum still uses an atomic.

Block sizes are reasoned, not yet tuned on a GPU: 64-wide channel tiles match conv1_1 (C = 64)
exactly and keep a 64x64 fp32 accumulator in registers; 64 positions per step keep each load a
64x64 tile (8 KiB in bf16).  The forward Gram runs 8 warps: with 4, the accumulator, the style
epilogue's target and difference tiles and the addresses took 206-255 registers a thread on sm_90
(cross-compiled, benchmarks/cross_compile.py, docs/compiled-kernels.md); with 8 each thread holds
half of every tile, and capped at 128 registers (16-bit; no spill) two blocks of 256 threads share
an SM: twice the threads of the 4-warp kernel's two 128-thread blocks, for the same tiles and
so the same work per byte moved.
``benchmarks/bench_kernels.py`` is where tuning should start.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

BLOCK_C = 64  # channel tile (rows and columns of an output tile)
BLOCK_K = 64  # positions reduced per inner step
BLOCK_M = 64  # positions per program in the backward product
BACKWARD_BLOCK_K = 32  # channels reduced per inner step of the backward product
# The forward Gram kernels' register cap at 16 bits (see _forward_options).
FORWARD_MAX_REGISTERS = 128
# Split M until there are about this many programs per streaming multiprocessor.
PROGRAMS_PER_SM = 4
# The interpreter has no SM count; a fixed small split still exercises the split path.
INTERPRETER_PROGRAMS = 8
# CUDA's limit on grid axis 0 (axes 1 and 2 allow only 65,535, which is why no launch uses them).
MAX_PROGRAMS = 2**31 - 1
# Positions per launch: program-local position indices are int32 (start + chunk, pm * BLOCK_M), so
# M stays well inside 2^31.  conv1_1 of a 32768 x 32768 image would be the first to pass it, with
# 137 GB of bf16 features for that one layer: no GPU holds an untiled image that large.
MAX_POSITIONS = 2**30
# Scratch sub-buffers start on multiples of this many elements (64 bytes), so wide loads stay aligned.
SCRATCH_ALIGN = 16


@triton.jit
def _gram_epilogue(g, target_ptr, out_ptr, loss_ptr, b, i, j, C, stride_tb, stride_tc, stride_tr,
                   loss_scale, BLOCK: tl.constexpr, STYLE: tl.constexpr):
    """Write the finished tile g = G[i-block, j-block] (and its mirror); for STYLE, D and the loss."""
    r = tl.arange(0, BLOCK)
    rows = i * BLOCK + r  # channel index of each tile row
    cols = j * BLOCK + r  # channel index of each tile column
    inside = (rows[:, None] < C) & (cols[None, :] < C)
    # On the diagonal tile the direct store takes the upper half (with the diagonal) and the
    # mirror the strict lower half, so every element is written once and G is exactly symmetric.
    direct = inside & ((i != j) | (r[:, None] <= r[None, :]))
    mirror = inside & ((i != j) | (r[:, None] < r[None, :]))
    out_base = out_ptr + b.to(tl.int64) * C * C
    direct_off = rows[:, None] * C + cols[None, :]  # G[row, col]
    mirror_off = cols[None, :] * C + rows[:, None]  # G[col, row], same tile positions
    if STYLE:
        t_base = target_ptr + b.to(tl.int64) * stride_tb
        # The direct half, then the mirrored one: one target tile and one difference tile live at a time.
        a = tl.load(t_base + rows[:, None] * stride_tc + cols[None, :] * stride_tr, mask=direct, other=0.0)
        d = tl.where(direct, g - a, 0.0)
        tl.store(out_base + direct_off, d, mask=direct)
        partial = tl.sum(tl.sum(d * d, axis=1), axis=0)
        a = tl.load(t_base + cols[None, :] * stride_tc + rows[:, None] * stride_tr, mask=mirror, other=0.0)
        d = tl.where(mirror, g - a, 0.0)
        tl.store(out_base + mirror_off, d, mask=mirror)
        partial += tl.sum(tl.sum(d * d, axis=1), axis=0)
        tl.atomic_add(loss_ptr + b, partial * loss_scale)
    else:
        tl.store(out_base + direct_off, g, mask=direct)
        tl.store(out_base + mirror_off, g, mask=mirror)


@triton.jit(do_not_specialize=["n_split"])  # one compiled variant whatever the split
def _gram_kernel(
    x_ptr, target_ptr, out_ptr, ws_ptr, counter_ptr, loss_ptr, C, M, stride_xb, stride_xc, stride_xm,
    stride_tb, stride_tc, stride_tr, tiles, chunk, n_split, loss_scale,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, STYLE: tl.constexpr, SPLIT: tl.constexpr,
    DOT: tl.constexpr,
):
    """One layer's Gram (or style loss): the arguments are _gram_program's."""
    _gram_program(tl.program_id(0), x_ptr, target_ptr, out_ptr, ws_ptr, counter_ptr, loss_ptr, C, M,
                  stride_xb, stride_xc, stride_xm, stride_tb, stride_tc, stride_tr, tiles, chunk, n_split,
                  loss_scale, BLOCK_C, BLOCK_K, STYLE, SPLIT, DOT)


@triton.jit
def _gram_program(
    pid,  # this program's index among the layer's programs
    x_ptr,  # features F, (B, C, M) at the strides below; fp32, bf16 or fp16
    target_ptr,  # STYLE: target Gram A (fp32), batch stride 0 when shared; else unused
    out_ptr,  # (B, C, C) fp32 contiguous: G, or D = G - A for STYLE
    ws_ptr,  # SPLIT: (B, C, C) fp32 zeroed workspace for partial tiles; else unused
    counter_ptr,  # SPLIT: (B, T, T) int32 zeroed arrival counters; else unused
    loss_ptr,  # STYLE: (B,) fp32, zeroed; sample b receives sum over its tiles of loss_scale * sum D^2
    C, M,  # channels, positions
    stride_xb, stride_xc, stride_xm,  # strides of F in elements
    stride_tb, stride_tc, stride_tr,  # strides of A in elements
    tiles,  # T = cdiv(C, BLOCK_C): tiles per side
    chunk,  # positions per split program, a multiple of BLOCK_K
    n_split,  # programs sharing one tile
    loss_scale,  # weight / (4 C^2 M^2)
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    STYLE: tl.constexpr,  # epilogue: False writes G, True writes D and the loss
    SPLIT: tl.constexpr,  # n_split > 1: accumulate through the workspace
    DOT: tl.constexpr,  # "ieee", "tf32" or "native" (dot_precision)
):
    # One grid axis (see the module docstring): pid = (b * n_split + part) * T^2 + tile, so the
    # programs that run side by side share their positions (part) and read the same F columns.
    tile = pid % (tiles * tiles)
    part = (pid // (tiles * tiles)) % n_split
    b = pid // (tiles * tiles * n_split)
    i = tile // tiles
    j = tile % tiles
    if i <= j:  # lower-triangle programs have nothing to do: their tile is a mirror
        r = tl.arange(0, BLOCK_C)
        rows = (i * BLOCK_C + r).to(tl.int64)
        cols = (j * BLOCK_C + r).to(tl.int64)
        x_base = x_ptr + b.to(tl.int64) * stride_xb
        acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        start = part * chunk
        end = tl.minimum(start + chunk, M)
        for k0 in range(start, end, BLOCK_K):
            k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            in_k = k[None, :] < end
            a = tl.load(x_base + rows[:, None] * stride_xc + k[None, :] * stride_xm,
                        mask=(rows[:, None] < C) & in_k, other=0.0)
            bt = tl.load(x_base + cols[:, None] * stride_xc + k[None, :] * stride_xm,
                         mask=(cols[:, None] < C) & in_k, other=0.0)
            if DOT == "native":
                acc += tl.dot(a, tl.trans(bt))
            else:
                acc += tl.dot(a.to(tl.float32), tl.trans(bt.to(tl.float32)), input_precision=DOT)
        if SPLIT:
            r32 = tl.arange(0, BLOCK_C)
            tile_rows = i * BLOCK_C + r32
            tile_cols = j * BLOCK_C + r32
            inside = (tile_rows[:, None] < C) & (tile_cols[None, :] < C)
            ws_tile = ws_ptr + b.to(tl.int64) * C * C + tile_rows[:, None] * C + tile_cols[None, :]
            tl.atomic_add(ws_tile, acc, mask=inside, sem="relaxed")
            # Every thread's partial sums must be issued before the counter says "done".
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + (b * tiles + i) * tiles + j, 1, sem="acq_rel")
            if arrived == n_split - 1:  # the last program owns the finished tile
                total = tl.load(ws_tile, mask=inside, other=0.0, cache_modifier=".cg")
                _gram_epilogue(total, target_ptr, out_ptr, loss_ptr, b, i, j, C, stride_tb, stride_tc,
                               stride_tr, loss_scale, BLOCK_C, STYLE)
        else:
            _gram_epilogue(acc, target_ptr, out_ptr, loss_ptr, b, i, j, C, stride_tb, stride_tc,
                           stride_tr, loss_scale, BLOCK_C, STYLE)


@triton.jit
def _gram_backward_kernel(
    d_ptr, x_ptr, grad_ptr, scale_ptr, scale, C, M, stride_xb, stride_xc, stride_xm, stride_gb, stride_gc,
    stride_gm, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SCALE_PTR: tl.constexpr, DOT: tl.constexpr,
):
    """One layer's D F product: the arguments are _gram_backward_program's."""
    _gram_backward_program(tl.program_id(0), d_ptr, x_ptr, grad_ptr, scale_ptr, scale, C, M, stride_xb,
                           stride_xc, stride_xm, stride_gb, stride_gc, stride_gm, BLOCK_C, BLOCK_M, BLOCK_K,
                           HAS_SCALE_PTR, DOT)


@triton.jit
def _gram_backward_program(
    pid,  # this program's index among the layer's programs
    d_ptr,  # D, (B, C, C) fp32 contiguous (symmetric)
    x_ptr,  # F, (B, C, M) at its strides
    grad_ptr,  # output, (B, C, M) at its strides, in its own dtype
    scale_ptr,  # HAS_SCALE_PTR: (B,) device fp32, sample b's result times scale_ptr[b] (grad_out)
    scale,  # a host float multiplying the result
    C, M,
    stride_xb, stride_xc, stride_xm,
    stride_gb, stride_gc, stride_gm,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SCALE_PTR: tl.constexpr, DOT: tl.constexpr,
):
    """grad[b, c, m] = scale * scale_ptr[b] * sum_k D[b, c, k] F[b, k, m]."""
    # One grid axis: pid = (b * m_blocks + pm) * c_blocks + pc; neighbouring programs take the
    # channel blocks of the same positions, so each F column block is read from L2 after the first.
    c_blocks = tl.cdiv(C, BLOCK_C)
    m_blocks = tl.cdiv(M, BLOCK_M)
    pc = pid % c_blocks
    pm = (pid // c_blocks) % m_blocks
    b = (pid // (c_blocks * m_blocks)).to(tl.int64)
    rows = (pc * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    cols = (pm * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    d_base = d_ptr + b * C * C
    x_base = x_ptr + b * stride_xb
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        d = tl.load(d_base + rows[:, None] * C + k[None, :], mask=(rows[:, None] < C) & (k[None, :] < C),
                    other=0.0)
        f = tl.load(x_base + k[:, None] * stride_xc + cols[None, :] * stride_xm,
                    mask=(k[:, None] < C) & (cols[None, :] < M), other=0.0)
        if DOT == "native":
            # bf16: D rounded to bf16 (same exponent range as fp32), products accumulated in fp32.
            acc += tl.dot(d.to(f.dtype), f)
        else:
            acc += tl.dot(d, f.to(tl.float32), input_precision=DOT)
    acc = acc * scale
    if HAS_SCALE_PTR:
        acc = acc * tl.load(scale_ptr + b)
    g_base = grad_ptr + b * stride_gb
    tl.store(g_base + rows[:, None] * stride_gc + cols[None, :] * stride_gm,
             acc.to(grad_ptr.dtype.element_ty), mask=(rows[:, None] < C) & (cols[None, :] < M))


@triton.jit
def _grouped_gram_kernel(
    x_ptrs, target_ptrs, out_ptrs,  # per layer: F, A and D, as for _gram_program
    scratch_ptr, counters_ptr,  # fp32 and int32 views of one zeroed buffer: losses (L, B), counters, workspaces
    workspace_at, counters_at,  # per layer: element offsets of its workspace and counters in the buffer
    batch,
    Cs, Ms, stride_xbs, stride_xcs, stride_xms, stride_tbs, stride_tcs, stride_trs, tiles, chunks,
    loss_scales,  # per layer, as for _gram_program
    LAYERS: tl.constexpr, SPLITS: tl.constexpr,  # SPLITS: per layer, n_split > 1
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
):
    """The style losses of all layers in one launch: each program runs _gram_program for its layer.

    Layer l owns the batch * n_split * T^2 programs after layer l - 1's.  Where a layer's programs
    start, and its split, are worked out here from its positions and chunk rather than passed:
    Triton specialises every integer of a tuple argument (equal to 1, divisible by 16), so program
    offsets and splits as arguments made a new compile for nearly every image size."""
    pid = tl.program_id(0)
    first = 0  # the first program of this layer
    for layer in tl.static_range(LAYERS):
        n_split = tl.maximum(tl.cdiv(Ms[layer], chunks[layer]), 1)  # as _GramLayer: no empty programs
        programs = batch * n_split * tiles[layer] * tiles[layer]
        if (pid >= first) & (pid < first + programs):
            _gram_program(pid - first, x_ptrs[layer], target_ptrs[layer], out_ptrs[layer],
                          scratch_ptr + workspace_at[layer], counters_ptr + counters_at[layer],
                          scratch_ptr + layer * batch, Cs[layer], Ms[layer], stride_xbs[layer], stride_xcs[layer],
                          stride_xms[layer], stride_tbs[layer], stride_tcs[layer], stride_trs[layer], tiles[layer],
                          chunks[layer], n_split, loss_scales[layer], BLOCK_C, BLOCK_K, True, SPLITS[layer], DOT)
        first += programs


@triton.jit
def _grouped_gram_backward_kernel(
    d_ptrs, x_ptrs, grad_ptrs,  # per layer: D, F and the gradient, as for _gram_backward_program
    scale_ptr,  # (L, B) fp32: layer l's sample b is multiplied by scale_ptr[l * batch + b]
    scales,  # per layer: a host float multiplying the result
    batch,
    Cs, Ms, stride_xbs, stride_xcs, stride_xms, stride_gbs, stride_gcs, stride_gms,  # per layer
    LAYERS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
):
    """The D F products of all layers in one launch: each program runs _gram_backward_program.
    Layer l owns the batch * cdiv(C, BLOCK_C) * cdiv(M, BLOCK_M) programs after layer l - 1's
    (worked out here, not passed, as in _grouped_gram_kernel)."""
    pid = tl.program_id(0)
    first = 0
    for layer in tl.static_range(LAYERS):
        programs = batch * tl.cdiv(Cs[layer], BLOCK_C) * tl.cdiv(Ms[layer], BLOCK_M)
        if (pid >= first) & (pid < first + programs):
            _gram_backward_program(pid - first, d_ptrs[layer], x_ptrs[layer], grad_ptrs[layer],
                                   scale_ptr + layer * batch, scales[layer], Cs[layer], Ms[layer],
                                   stride_xbs[layer], stride_xcs[layer], stride_xms[layer], stride_gbs[layer],
                                   stride_gcs[layer], stride_gms[layer], BLOCK_C, BLOCK_M, BLOCK_K, True, DOT)
        first += programs


# --------------------------------------------------------------------------------------------
# Launchers


def as_bcm(x: torch.Tensor) -> tuple[torch.Tensor, int, int, tuple[int, int, int]]:
    """View features as (B, C, M) strides without copying when the layout allows it.

    (B, C, H, W) merges H and W when stride_h == W * stride_w, true for contiguous NCHW and for
    channels_last; any other layout is copied to contiguous (documented fallback).
    Returns (tensor, C, M, (stride_b, stride_c, stride_m)).
    """
    if x.dim() == 4:
        _, channels, height, width = x.shape
        if height > 1 and width > 1 and x.stride(2) != width * x.stride(3):
            x = x.contiguous()
        stride_m = x.stride(3) if width > 1 else x.stride(2)
        return x, channels, height * width, (x.stride(0), x.stride(1), stride_m)
    if x.dim() == 3:
        return x, x.shape[1], x.shape[2], (x.stride(0), x.stride(1), x.stride(2))
    raise ValueError(f"features must have shape (B, C, H, W) or (B, C, M), not {tuple(x.shape)}")


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older Triton without knobs: read the variable it reads
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_precision(x: torch.Tensor, backward: bool = False) -> str:
    """How the kernels form their products: the ``DOT`` constexpr.

    "ieee": fp32 operands multiplied exactly (CUDA cores): fp32 features, and under the
    interpreter, whose bf16/fp16 dot is wrong (numpy has no bf16 matmul).
    "tf32": fp32 operands rounded to tf32 on the tensor cores: fp16's backward product, where
    D = G - A is of order M F^2 and would overflow fp16's 65504.  tf32 keeps fp32's range and
    fp16's 10-bit mantissa, so F is exact and D is rounded no worse than an fp16 result; the
    fp32 "ieee" product it replaces needed 255 registers and spilled on sm_90.
    "native": the 16-bit operands on the tensor cores, fp32 accumulation (bf16 has fp32's range,
    so its backward rounds D to bf16).
    """
    if backward and x.dtype == torch.float16:
        return "tf32"  # the interpreter computes it in fp32: the same code path, exactly
    return "ieee" if x.dtype == torch.float32 or interpreting() else "native"


def _forward_options(x: torch.Tensor) -> dict:
    """Launch options of the forward Gram kernels.  8 warps: each thread holds half of every 64x64
    tile that 4 warps held (206-255 registers there).  16-bit features are capped at 128 registers,
    which they fit without a spill (cross-compiled for sm_90: at most 126 with Triton 3.6, 116 with
    3.8; docs/compiled-kernels.md), so two blocks of 256 threads share an SM; fp32's ieee products
    would spill under the cap and keep the compiler's choice."""
    options = {"num_warps": 8, "num_stages": 3}
    if x.dtype != torch.float32:
        options["maxnreg"] = FORWARD_MAX_REGISTERS
    return options


def programs_wanted(device: torch.device) -> int:
    """Programs that fill ``device``: a few per streaming multiprocessor (a fixed small number
    under the interpreter, which has no SMs but must still take the split path)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(x: torch.Tensor, tiles_total: int, positions: int) -> int:
    """How many programs share a tile: enough to give every SM a few programs, or one when
    PyTorch is asked for deterministic algorithms (no float atomics, same bits every run)."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    steps = triton.cdiv(positions, BLOCK_K)
    return max(1, min(steps, triton.cdiv(programs_wanted(x.device), tiles_total)))


def grid_1d(programs: int, kernel: str) -> tuple[int]:
    """The one-axis grid of ``programs`` programs; a clear error where CUDA would refuse it."""
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{kernel} would need {programs} programs, more than CUDA's {MAX_PROGRAMS} per "
                         f"launch; evaluate the image in tiles (--tile)")
    return (max(1, programs),)


def check_positions(positions: int) -> None:
    if positions > MAX_POSITIONS:
        raise ValueError(f"features with {positions} positions per channel are more than the kernels "
                         f"index ({MAX_POSITIONS}); evaluate the image in tiles (--tile)")


def _aligned(count: int) -> int:
    """``count`` rounded up to a multiple of SCRATCH_ALIGN elements."""
    return triton.cdiv(count, SCRATCH_ALIGN) * SCRATCH_ALIGN


def new_output(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output; tests replace this with a NaN-filled allocation to catch gaps."""
    return torch.empty(shape, dtype=dtype, device=device)


def new_like(x: torch.Tensor) -> torch.Tensor:
    """Uninitialised tensor like x (same layout when x is dense); tests poison it with NaN."""
    return torch.empty_like(x)


class _GramLayer:
    """How one layer's Gram is launched: its (B, C, M) view, tiles, split and scratch needs."""

    def __init__(self, x: torch.Tensor, target: torch.Tensor | None, loss_scale: float, split: int | None = None):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"gram supports fp32, bf16 and fp16 features, not {x.dtype}")
        self.x, self.channels, self.positions, self.strides = as_bcm(x)
        check_positions(self.positions)
        self.batch = batch = self.x.shape[0]
        channels = self.channels
        self.tiles = triton.cdiv(channels, BLOCK_C)
        n_split = split or _split_for(self.x, self.tiles * (self.tiles + 1) // 2 * batch, self.positions)
        self.chunk = max(1, triton.cdiv(triton.cdiv(self.positions, n_split), BLOCK_K)) * BLOCK_K
        self.n_split = max(1, triton.cdiv(self.positions, self.chunk))  # no empty programs
        self.programs = batch * self.n_split * self.tiles * self.tiles
        self.counters = batch * self.tiles * self.tiles if self.n_split > 1 else 0
        self.workspace = batch * channels * channels if self.n_split > 1 else 0
        self.out = new_output((batch, channels, channels), torch.float32, self.x.device)
        self.loss_scale = float(loss_scale)
        self.style = target is not None
        if self.style:
            if tuple(target.shape) not in ((channels, channels), (batch, channels, channels)):
                raise ValueError(f"target Gram must be ({channels}, {channels}) or ({batch}, {channels}, "
                                 f"{channels}), not {tuple(target.shape)}")
            self.target = target.float().expand(batch, channels, channels)  # shared A: batch stride 0
            self.target_strides = self.target.stride()
        else:
            self.target, self.target_strides = self.out, (0, 0, 0)  # unused by the kernel


def positions_per_program(x: torch.Tensor, split: int | None = None) -> int:
    """How many positions one program of x's Gram sums (the launcher's split; ``split`` forces it):
    what the rounding error of a 16-bit Gram grows with (benchmarks/check_kernels.py)."""
    layer = _GramLayer(x, None, 0.0, split)
    return min(layer.chunk, layer.positions)


def _scratch(layers: list[_GramLayer], device) -> tuple[torch.Tensor, list[int], list[int]]:
    """One zeroed allocation (one memset) for every layer's losses, arrival counters and split
    workspace; each part starts on a 64-byte boundary so the workspace's tile loads stay wide.
    Returns it with each layer's counter and workspace offsets (elements)."""
    at = _aligned(sum(layer.batch for layer in layers))  # the losses come first, layer after layer
    counters_at, workspaces_at = [], []
    for layer in layers:
        counters_at.append(at)
        at += _aligned(layer.counters)
    for layer in layers:
        workspaces_at.append(at)
        at += _aligned(layer.workspace)
    return torch.zeros(at, dtype=torch.float32, device=device), counters_at, workspaces_at


def _grid_for(layers: list, kernel: str) -> tuple[int]:
    """The grid of a grouped launch: every layer's programs, one after another on the one axis
    (the kernel works out where each layer's begin from the same sizes)."""
    return grid_1d(sum(layer.programs for layer in layers), kernel)


def _per_layer(layers: list, field) -> tuple:
    """One kernel argument of a grouped launch: ``field(layer)`` for every layer, as a tuple."""
    return tuple(field(layer) for layer in layers)


def launch_gram(x: torch.Tensor, target: torch.Tensor | None = None, loss_scale: float = 0.0,
                split: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """G (target None) or D = G - A and the per-sample losses (target given), all fp32.

    Returns (out, losses) with out (B, C, C) and losses (B,) (None without a target).
    ``split`` forces the number of programs per tile (tests); None picks it from the device.
    """
    layer = _GramLayer(x, target, loss_scale, split)
    scratch, (counters_at,), (workspace_at,) = _scratch([layer], layer.x.device)
    loss = scratch[:layer.batch]
    counters = scratch[counters_at:].view(torch.int32)
    grid = grid_1d(layer.programs, "the Gram kernel")
    _gram_kernel[grid](
        layer.x, layer.target, layer.out, scratch[workspace_at:], counters, loss, layer.channels,
        layer.positions, *layer.strides, *layer.target_strides, layer.tiles, layer.chunk, layer.n_split,
        layer.loss_scale, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, STYLE=layer.style, SPLIT=layer.n_split > 1,
        DOT=dot_precision(layer.x), **_forward_options(layer.x))
    return layer.out, (loss if layer.style else None)


def launch_grouped_style_losses(xs: list[torch.Tensor], targets: list[torch.Tensor], loss_scales: list[float],
                                split: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's D = G - A and per-sample losses in one launch (and one memset): the layers'
    programs follow each other on the one grid axis and each program finds its layer.

    Returns ([D per layer], losses (L, B) fp32).  The features share dtype, device and batch.
    """
    layers = [_GramLayer(x, target, scale, split) for x, target, scale in zip(xs, targets, loss_scales)]
    batch = layers[0].batch
    if any(layer.batch != batch or layer.x.dtype != layers[0].x.dtype for layer in layers):
        raise ValueError("grouped style losses need features of one batch size and dtype")
    scratch, counters_at, workspaces_at = _scratch(layers, layers[0].x.device)
    grid = _grid_for(layers, "the grouped Gram kernel")
    each = functools.partial(_per_layer, layers)
    _grouped_gram_kernel[grid](
        each(lambda layer: layer.x), each(lambda layer: layer.target), each(lambda layer: layer.out),
        scratch, scratch.view(torch.int32), tuple(workspaces_at), tuple(counters_at), batch,
        each(lambda layer: layer.channels), each(lambda layer: layer.positions),
        each(lambda layer: layer.strides[0]), each(lambda layer: layer.strides[1]),
        each(lambda layer: layer.strides[2]), each(lambda layer: layer.target_strides[0]),
        each(lambda layer: layer.target_strides[1]), each(lambda layer: layer.target_strides[2]),
        each(lambda layer: layer.tiles), each(lambda layer: layer.chunk), each(lambda layer: layer.loss_scale),
        LAYERS=len(layers), SPLITS=each(lambda layer: layer.n_split > 1),
        BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, DOT=dot_precision(layers[0].x), **_forward_options(layers[0].x))
    return [layer.out for layer in layers], scratch[:batch * len(layers)].view(len(layers), batch)


class _BackwardLayer:
    """How one layer's D F product is launched: its (B, C, M) view, its gradient (shaped and laid
    out like the features, in their dtype) and the program count."""

    def __init__(self, d: torch.Tensor, x: torch.Tensor, scale: float):
        self.x, self.channels, self.positions, self.strides = as_bcm(x)
        # self.x's layout merges H and W, and empty_like keeps it; an empty layer gets no programs.
        self.grad = new_like(self.x) if self.positions else torch.zeros_like(self.x)
        self.grad_strides = as_bcm(self.grad)[3]
        check_positions(self.positions)
        self.d = d.float().contiguous()
        self.scale = float(scale)
        self.programs = (x.shape[0] * triton.cdiv(self.channels, BLOCK_C) * triton.cdiv(self.positions, BLOCK_M)
                         if self.positions else 0)


def launch_gram_backward(d: torch.Tensor, x: torch.Tensor, scale: float = 1.0,
                         scale_tensor: torch.Tensor | None = None) -> torch.Tensor:
    """scale * scale_tensor[b] * D_b F_b, shaped and laid out like x, in x's dtype; scale_tensor
    is (B,) fp32 contiguous (autograd's grad_out of per-sample losses) or None."""
    layer = _BackwardLayer(d, x, scale)
    if not layer.programs:
        return layer.grad
    _gram_backward_kernel[grid_1d(layer.programs, "the Gram backward kernel")](
        layer.d, layer.x, layer.grad, scale_tensor if scale_tensor is not None else layer.d, layer.scale,
        layer.channels, layer.positions, *layer.strides, *layer.grad_strides, BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M,
        BLOCK_K=BACKWARD_BLOCK_K, HAS_SCALE_PTR=scale_tensor is not None,
        DOT=dot_precision(layer.x, backward=True), num_warps=4, num_stages=3)
    return layer.grad


def launch_grouped_gram_backward(ds: list[torch.Tensor], xs: list[torch.Tensor], scales: list[float],
                                 scale_tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's scales[l] * scale_tensor[l, b] * D_b F_b in one launch; scale_tensor is (L, B)
    fp32 contiguous (autograd's grad_out of the grouped losses).  Each gradient is shaped and laid
    out like its features, in their dtype."""
    layers = [_BackwardLayer(d, x, scale) for d, x, scale in zip(ds, xs, scales)]
    grid = _grid_for(layers, "the grouped Gram backward kernel")
    each = functools.partial(_per_layer, layers)
    _grouped_gram_backward_kernel[grid](
        each(lambda layer: layer.d), each(lambda layer: layer.x), each(lambda layer: layer.grad), scale_tensor,
        each(lambda layer: layer.scale), xs[0].shape[0], each(lambda layer: layer.channels),
        each(lambda layer: layer.positions), each(lambda layer: layer.strides[0]),
        each(lambda layer: layer.strides[1]), each(lambda layer: layer.strides[2]),
        each(lambda layer: layer.grad_strides[0]), each(lambda layer: layer.grad_strides[1]),
        each(lambda layer: layer.grad_strides[2]), LAYERS=len(layers), BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M,
        BLOCK_K=BACKWARD_BLOCK_K, DOT=dot_precision(xs[0], backward=True), num_warps=4, num_stages=3)
    return [layer.grad for layer in layers]


class Gram(torch.autograd.Function):
    """G = F F^T with the Triton kernels; backward is (grad_G + grad_G^T) F."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, _ = launch_gram(x)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        symmetric = grad_out + grad_out.transpose(1, 2)
        return launch_gram_backward(symmetric, x)


def gram(x: torch.Tensor) -> torch.Tensor:
    """(B, C, C) fp32 Gram matrices of (B, C, H, W) or (B, C, M) features, computed by Triton."""
    return Gram.apply(x)
