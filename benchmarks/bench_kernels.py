"""Kernel benchmark: the Triton Gram and fused style loss against their PyTorch twins.

Times, with ``triton.testing.do_bench`` (median), at the five VGG19 style layers' shapes for
512, 1024 and 2048 px square inputs:

- ``gram``: the symmetric Triton kernel; the torch twin (fp32, as ``kernels/reference.py``); and
  for 16-bit inputs a plain cuBLAS matmul in that dtype (rounds G to 16 bits: faster, less exact);
- ``style fwd+bwd``: the fused Triton style loss, forward and backward; the torch twin through
  autograd.

Each row prints ms, useful TFLOP/s, GB/s and the floor: the larger of the bytes over the measured
copy bandwidth and the useful FLOPs over the measured matmul rate (Gram: C^2 M, half a matmul;
style forward + backward: 3 C^2 M).  Peak rates are measured on the day (a large matmul in the
benchmarked dtype, a device-to-device copy), not taken from datasheets.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--sizes 512 1024 2048] [--dtypes bf16 fp32]
                                                    [--layouts contiguous channels_last] [--json PATH]

Without CUDA it prints that it was skipped and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stage_util.py, beside this file, when imported

# The style layers of the default objective: (name, channels, downsampling factor).
STYLE_LAYERS = (("conv1_1", 64, 1), ("conv2_1", 128, 2), ("conv3_1", 256, 4), ("conv4_1", 512, 8),
                ("conv5_1", 512, 16))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layer_shapes(size: int) -> list[tuple[str, int, int]]:
    """(layer, C, M) of each style layer for a size x size input."""
    return [(name, channels, (size // factor) ** 2) for name, channels, factor in STYLE_LAYERS]


def gram_cost(channels: int, positions: int, element_bytes: int) -> tuple[float, float]:
    """Useful FLOPs (the upper triangle: C^2 M) and bytes (read F once, write G) of one Gram."""
    return float(channels**2 * positions), float(channels * positions * element_bytes + channels**2 * 4)


def style_cost(channels: int, positions: int, element_bytes: int) -> tuple[float, float]:
    """Style loss forward (C^2 M) + backward (2 C^2 M); F read twice, the gradient written once."""
    return 3.0 * channels**2 * positions, 3.0 * channels * positions * element_bytes + 3 * channels**2 * 4


def features(channels: int, positions: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    side = int(round(positions**0.5))
    x = torch.randn(1, channels, side, side, device="cuda", dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def measure_peaks(dtype: torch.dtype) -> dict:
    """Matmul TFLOP/s in ``dtype`` (8192^3) and device-to-device copy GB/s (1 GiB)."""
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    matmul_ms = do_bench(lambda: a @ b, warmup=10, rep=50, return_mode="median")
    src = torch.empty(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6}


def _style_step(fn, x, target):
    def run():
        loss = fn(x, target, 1.0)
        torch.autograd.grad(loss, x)

    return run


def bench(sizes, dtype_names, layouts, on_row=lambda row: None, peaks=None) -> tuple[list[dict], dict]:
    """Time every case; ``on_row(row)`` after each one (a caller can save as it goes)."""
    from triton.testing import do_bench

    from fastnst.kernels import reference, triton_gram, triton_style_loss

    rows, peaks = [], {} if peaks is None else peaks
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        peak = peaks[dtype_name] = measure_peaks(dtype)
        for layout in layouts:
            for size in sizes:
                for layer, channels, positions in layer_shapes(size):
                    x = features(channels, positions, dtype, layout)
                    element = x.element_size()
                    target = reference.gram(x)[0] * 0.9
                    cases = [
                        ("gram", "triton", lambda: triton_gram.gram(x), gram_cost),
                        ("gram", "torch twin", lambda: reference.gram(x), gram_cost),
                    ]
                    if dtype != torch.float32:
                        flat = x.flatten(2)
                        cases.append(("gram", f"cuBLAS {dtype_name}", lambda: flat @ flat.transpose(1, 2),
                                      gram_cost))
                    xg = x.detach().requires_grad_(True)
                    cases += [
                        ("style fwd+bwd", "triton", _style_step(triton_style_loss.style_loss, xg, target),
                         style_cost),
                        ("style fwd+bwd", "torch twin", _style_step(reference.style_loss, xg, target),
                         style_cost),
                    ]
                    for op, impl, fn, cost in cases:
                        ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
                        flops, moved = cost(channels, positions, element)
                        floor_ms = max(moved / (peak["copy_gbps"] * 1e6), flops / (peak["matmul_tflops"] * 1e9))
                        rows.append(dict(size=size, layer=layer, C=channels, M=positions, dtype=dtype_name,
                                         layout=layout, op=op, impl=impl, ms=ms,
                                         tflops=flops / ms / 1e9, gbps=moved / ms / 1e6,
                                         floor_ms=floor_ms, x_floor=ms / floor_ms))
                        on_row(rows[-1])
    return rows, peaks


def launch_overhead_ms() -> dict:
    """Time of the fused style loss forward+backward on a tiny layer: pure launch cost."""
    from triton.testing import do_bench

    from fastnst.kernels import triton_style_loss

    x = torch.randn(1, 64, 8, 8, device="cuda", requires_grad=True)
    target = torch.zeros(64, 64, device="cuda")
    ms = do_bench(_style_step(triton_style_loss.style_loss, x, target), warmup=10, rep=100,
                  return_mode="median")
    return {"style_fwd_bwd_tiny_ms": ms}


def print_table(rows: list[dict], peaks: dict, overhead: dict) -> None:
    for name, peak in peaks.items():
        print(f"measured peaks ({name}): matmul {peak['matmul_tflops']:.0f} TFLOP/s, "
              f"copy {peak['copy_gbps']:.0f} GB/s")
    print(f"launch overhead (style fwd+bwd at 64 x 8 x 8): {overhead['style_fwd_bwd_tiny_ms'] * 1e3:.1f} us")
    header = f"{'size':>5} {'layer':8} {'dtype':5} {'layout':13} {'op':14} {'impl':12} {'ms':>9} " \
             f"{'TFLOP/s':>8} {'GB/s':>7} {'floor ms':>9} {'x floor':>7}"
    print(header)
    for r in rows:
        print(f"{r['size']:>5} {r['layer']:8} {r['dtype']:5} {r['layout']:13} {r['op']:14} {r['impl']:12} "
              f"{r['ms']:9.4f} {r['tflops']:8.1f} {r['gbps']:7.0f} {r['floor_ms']:9.4f} {r['x_floor']:7.2f}")


def summary(rows: list[dict]) -> str:
    """The Triton rows' distance from their floors, per op: the median and the worst."""
    parts = []
    for op in ("gram", "style fwd+bwd"):
        ratios = sorted(r["x_floor"] for r in rows if r["op"] == op and r["impl"] == "triton")
        if ratios:
            parts.append(f"{op} triton: median {ratios[len(ratios) // 2]:.2f}x floor, worst {ratios[-1]:.2f}x "
                         f"({len(ratios)} cases)")
    return "; ".join(parts) or "no rows measured"


def main(argv=None) -> int:
    from stage_util import Results, figures

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"],
                        default=["contiguous", "channels_last"])
    parser.add_argument("--json", type=Path, help="also write the results and their provenance here, "
                                                  "rewritten after every row")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: kernel benchmark skipped")
        figures("skipped: no CUDA device")
        return 0
    results = Results(args.json, "fastnst kernel benchmark", peaks={})

    def keep(row: dict) -> None:
        results.add(row)
        print(row, flush=True)
        figures(summary(results.rows))

    rows, peaks = bench(args.sizes, args.dtypes, args.layouts, on_row=keep, peaks=results.document["peaks"])
    overhead = launch_overhead_ms()
    results.document["launch"] = overhead
    results.save()
    print_table(rows, peaks, overhead)
    figures(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
