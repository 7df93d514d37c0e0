"""Stage 1 of the GPU check: the compiled Triton kernels at the shapes real runs give them.

For the five style layers and the content layer (conv4_2) of square images of 512, 1024 and 2048
px, in bf16, fp32 and fp16, channels_last and contiguous, with fresh random features each case:

- the Gram (split over programs as the launcher picks it) against float64;
- the fused style loss and its gradient against float64 (target A = G / 2, so D = G - A has the
  size of G and no cancellation blurs the comparison; the weight scales the gradient to O(1) so
  fp16 does not flush it to zero);
- on conv4_2, the content loss and its gradient against float64;
- after each size's layers (first layout of each dtype, the fast path's): the five style layers'
  losses and gradients from the grouped kernels (one launch each way), against float64.

Outputs are allocated NaN-filled, so an element a kernel never writes fails.  Tolerances: fp32
values 2e-5 relative to the largest element (the kernel tests', tests/test_kernels.py); 16-bit
values by the tensor-core error model below (``value_tolerance``), from the positions each program
sums; gradients, which are written in the features' dtype, 2e-5 (fp32), 2e-3 (fp16), 2e-2 (bf16).  Then the split-
reduction stress: one conv1_1 Gram at 512 splits, 50 times in bf16 and in fp32; every repeat must
match float64 and the repeats must agree to fp32 rounding (the partial tiles are added with
atomics, so the summation order, and with it the last bits, may change between repeats; how many
repeats are bit-identical to the first is reported).  A race in the arrival-counter protocol
(the last program reading the workspace before every partial landed) would be off by at least a
partial tile, orders of magnitude more.  Cases run in order of value (bf16 channels_last first,
the fast path's), each written to the JSON as it finishes.

Before the checks, the kernels are compiled into Triton's cache by ``cross_compile.py`` in one
process per dtype and layout, side by side (``precompile``): the checks then load them instead of
compiling about 50 kernels one after another in this process (~1-2 s each).  A precompile that
fails or runs out of its time leaves the checks to compile what is missing, as before.

    PYTHONPATH=. python3 benchmarks/check_kernels.py [--json PATH] [--dry-run]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from stage_util import Results, device_for, figures, first_line, relative_error, run_stage, stage_parser

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
VALUE_TOLERANCE = 2e-5
GRAD_TOLERANCE = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 2e-2}
STRESS_SPLIT, STRESS_REPEATS, STRESS_SIZE = 512, 50, 1024
# Repeats of the split Gram may differ by the rounding of a changed summation order, no more.
STRESS_SPREAD = 2e-6
# The error model of 16-bit Grams.  bf16 and fp16 products are exact in fp32, and the float64
# reference is formed from the same rounded features, so the difference is the accumulation's.  The
# tensor cores' fp32 accumulation is not IEEE round-to-nearest: each k16 step's sum is truncated,
# up to one ulp (2^-23 relative), always toward zero, so a program's steps add their errors instead
# of cancelling.  A program summing P positions of a tile is off by at most P/16 * 2^-23; the
# partial tiles' fp32 additions (atomics, round-to-nearest) stay within the fp32 floor.  The style
# loss with A = G / 2 has D = G / 2, twice G's relative error, and squares it: 4 times G's bound.
# At 2048 px, conv1_1 split over 528 programs sums 8000 positions each: 500 steps, a bound of 6e-5
# on G and 2.4e-4 on the loss, where 2.3-4.2e-5 was expected of a correct kernel (a flat 2e-5 failed
# it); a lost partial tile would be 1/528 = 1.9e-3 off.
TENSOR_CORE_K = 16
TRUNCATION = 2.0**-23
LOSS_ERROR_GROWTH = 4


def value_tolerance(dtype_name: str, positions_per_program: int, growth: int = 1) -> float:
    """The largest relative error of a correct Gram (growth 1) or style loss (growth 4) of features
    in ``dtype_name`` whose programs each sum ``positions_per_program`` positions."""
    if dtype_name == "fp32":
        return VALUE_TOLERANCE  # CUDA cores, round-to-nearest
    steps = -(-positions_per_program // TENSOR_CORE_K)
    return VALUE_TOLERANCE + growth * steps * TRUNCATION


PRECOMPILE_SECONDS = 45


def precompile(sizes: list[int], dtype_names: list[str], layouts, sms: int) -> dict:
    """Fill Triton's cache with the kernels the checks launch, one cross_compile.py per dtype and
    layout in parallel.  Returns what it did, for the JSON."""
    script = Path(__file__).with_name("cross_compile.py")
    started = time.perf_counter()
    common = [sys.executable, str(script), "--mode", "split", "--sms", str(sms), *(f"--size={s}" for s in sizes)]
    jobs = [subprocess.Popen([*common, "--dtype", dtype_name, "--layout", layout], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for dtype_name in dtype_names for layout in layouts]
    finished, summaries = 0, []
    for job in jobs:
        try:
            output, _ = job.communicate(timeout=max(1.0, PRECOMPILE_SECONDS - (time.perf_counter() - started)))
            finished += job.returncode == 0
            summaries.append(output.strip().splitlines()[-1] if output.strip() else f"exit {job.returncode}")
        except subprocess.TimeoutExpired:
            job.kill()
            job.communicate()
            summaries.append("stopped at the precompile's time limit")
    return dict(kind="precompile", processes=len(jobs), finished=finished,
                seconds=round(time.perf_counter() - started, 1), summaries=summaries,
                ok=True)  # never the verdict: the checks compile whatever is missing


def poison_outputs() -> None:
    """Kernel outputs start as NaN (as in the kernel tests) instead of whatever memory held."""
    from fastnst.kernels import triton_gram

    triton_gram.new_output = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                      device=device)
    triton_gram.new_like = lambda x: torch.empty_like(x).fill_(float("nan"))


def features(channels: int, side: int, dtype: torch.dtype, layout: str, device) -> torch.Tensor:
    x = torch.randn(1, channels, side, side, device=device).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def check_style_layer(x: torch.Tensor, dtype_name: str) -> dict:
    from fastnst.kernels import triton_gram, triton_style_loss

    f64 = x.double().flatten(2)
    channels, positions = f64.shape[1], f64.shape[2]
    g64 = f64 @ f64.transpose(1, 2)
    gram, _ = triton_gram.launch_gram(x)
    gram_error = relative_error(gram, g64)

    target = (g64[0] * 0.5).float()
    d64 = g64[0] - target.double()
    unit = 1.0 / (channels**2 * positions**2)  # gradient factor at weight 1: D F / (C^2 M^2)
    grad64 = (d64 @ f64[0]) * unit
    weight = 1.0 / grad64.abs().max().item()
    loss64 = d64.square().sum() * weight * unit / 4
    leaf = x.detach().requires_grad_(True)
    loss = triton_style_loss.style_loss(leaf, target, weight)
    (grad,) = torch.autograd.grad(loss, leaf)
    layout_ok = grad.dtype == x.dtype and grad.stride() == x.stride()
    loss_error = relative_error(loss, loss64)
    grad_error = relative_error(grad.flatten(2)[0], grad64 * weight)
    per_program = triton_gram.positions_per_program(x)
    gram_tolerance = value_tolerance(dtype_name, per_program)
    loss_tolerance = value_tolerance(dtype_name, per_program, LOSS_ERROR_GROWTH)
    ok = (gram_error <= gram_tolerance and loss_error <= loss_tolerance and layout_ok
          and grad_error <= GRAD_TOLERANCE[dtype_name])
    return dict(gram_error=gram_error, loss_error=loss_error, grad_error=grad_error, layout_ok=layout_ok,
                positions_per_program=per_program, gram_tolerance=gram_tolerance, loss_tolerance=loss_tolerance,
                ok=ok)


def check_grouped(xs: list[torch.Tensor], dtype_name: str) -> dict:
    """All style layers through the grouped kernels; per-layer grad_out 1 / max |grad| keeps every
    gradient O(1).  Targets A = G / 2, as for one layer."""
    from fastnst.kernels import triton_gram, triton_style_loss

    targets, losses64, grads64, grad_out = [], [], [], []
    for x in xs:
        f64 = x.double().flatten(2)[0]
        channels, positions = f64.shape
        g64 = f64 @ f64.T
        targets.append((g64 * 0.5).float())
        d64 = g64 - targets[-1].double()
        unit = 1.0 / (channels**2 * positions**2)
        grads64.append((d64 @ f64) * unit)
        grad_out.append(1.0 / grads64[-1].abs().max().item())
        losses64.append(d64.square().sum() * unit / 4)
    leaves = [x.detach().requires_grad_(True) for x in xs]
    losses = triton_style_loss.GroupedStyleLosses.apply(len(leaves), False, *leaves, *targets)  # no fallback
    scales = torch.tensor(grad_out, device=losses.device)[:, None]
    grads = torch.autograd.grad(losses, leaves, grad_outputs=scales.expand_as(losses).contiguous())
    loss_errors = [relative_error(losses[i, 0], losses64[i]) for i in range(len(xs))]
    loss_tolerances = [value_tolerance(dtype_name, triton_gram.positions_per_program(x), LOSS_ERROR_GROWTH)
                       for x in xs]
    grad_error = max(relative_error(g.flatten(2)[0], g64 * s) for g, g64, s in zip(grads, grads64, grad_out))
    layout_ok = all(g.dtype == x.dtype and g.stride() == x.stride() for g, x in zip(grads, xs))
    ok = (all(e <= t for e, t in zip(loss_errors, loss_tolerances)) and grad_error <= GRAD_TOLERANCE[dtype_name]
          and layout_ok)
    return dict(loss_error=max(loss_errors), grad_error=grad_error, layout_ok=layout_ok,
                loss_errors=loss_errors, loss_tolerances=loss_tolerances, ok=ok)


def check_content_layer(x: torch.Tensor, dtype_name: str) -> dict:
    from fastnst.kernels import triton_content_loss

    target = torch.randn_like(x, dtype=torch.float32).to(x.dtype)
    diff64 = x.double() - target.double()
    leaf = x.detach().requires_grad_(True)
    loss = triton_content_loss.content_loss(leaf, target)
    (grad,) = torch.autograd.grad(loss, leaf)
    layout_ok = grad.dtype == x.dtype and grad.stride() == x.stride()
    loss_error = relative_error(loss, 0.5 * diff64.square().sum())
    grad_error = relative_error(grad, diff64)
    ok = loss_error <= VALUE_TOLERANCE and grad_error <= GRAD_TOLERANCE[dtype_name] and layout_ok
    return dict(loss_error=loss_error, grad_error=grad_error, layout_ok=layout_ok, ok=ok)


def split_stress(dtype_name: str, side: int, split: int, repeats: int, device) -> dict:
    """The same conv1_1 Gram ``repeats`` times at ``split`` programs per tile."""
    from fastnst.kernels import triton_gram

    x = features(64, side, DTYPES[dtype_name], "channels_last", device)
    f64 = x.double().flatten(2)
    g64 = f64 @ f64.transpose(1, 2)
    first, worst_error, worst_spread, identical = None, 0.0, 0.0, 0
    for _ in range(repeats):
        gram, _ = triton_gram.launch_gram(x, split=split)
        worst_error = max(worst_error, relative_error(gram, g64))
        if first is None:
            first = gram.clone()
        else:
            worst_spread = max(worst_spread, relative_error(gram, first))
            identical += int(torch.equal(gram, first))
    tolerance = value_tolerance(dtype_name, triton_gram.positions_per_program(x, split))
    ok = worst_error <= tolerance and worst_spread <= STRESS_SPREAD
    return dict(kind="split stress", dtype=dtype_name, side=side, split=split, repeats=repeats, tolerance=tolerance,
                max_error=worst_error, max_spread=worst_spread, bit_identical_to_first=f"{identical}/{repeats - 1}",
                ok=ok)


def cases(sizes, dtype_names, layouts, style_layers, content_layers):
    """(dtype, layout, size, layer, kind) in order of value, the fast path's first; kind is style,
    content or grouped (layer "style layers", after each size's layers in the first layout)."""
    for dtype_name in dtype_names:
        for layout in layouts:
            for size in sizes:
                for layer in (*style_layers, *content_layers):
                    yield dtype_name, layout, size, layer, "style" if layer in style_layers else "content"
                if layout == layouts[0]:
                    yield dtype_name, layout, size, "style layers", "grouped"


def summary(results: Results, total: int) -> str:
    rows = [r for r in results.rows if r.get("kind") == "case"]
    stress = [r for r in results.rows if r.get("kind") == "split stress"]
    failed = [f"{r['dtype']} {r['layout']} {r['size']} {r['layer']}" for r in rows if not r["ok"]]
    worst = {}
    for r in rows:
        for key in ("gram_error", "loss_error"):
            if key in r:
                worst[key] = max(worst.get(key, 0.0), r[key])
        worst[f"grad {r['dtype']}"] = max(worst.get(f"grad {r['dtype']}", 0.0), r["grad_error"])
    parts = [f"{sum(r['ok'] for r in rows)}/{len(rows)} of {total} cases ok",
             "max rel err " + ", ".join(f"{k.replace('_error', '')} {v:.1e}" for k, v in worst.items())]
    parts += [f"stress {s['dtype']} {s['repeats']}x split {s['split']}: {'ok' if s['ok'] else 'FAIL'} "
              f"(err {s['max_error']:.1e}, spread {s['max_spread']:.1e}, bit-identical {s['bit_identical_to_first']})"
              for s in stress]
    if failed:
        parts.append("FAILED: " + "; ".join(failed[:6]) + (" ..." if len(failed) > 6 else ""))
    return "; ".join(parts)


def main() -> int:
    from fastnst.config import StyleConfig
    from fastnst.vgg import layer_channels, layer_stride

    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    args = parser.parse_args()
    device = device_for(args.dry_run)
    poison_outputs()
    config = StyleConfig()
    sizes, dtype_names = args.sizes, args.dtypes
    stress = dict(side=STRESS_SIZE, split=STRESS_SPLIT, repeats=STRESS_REPEATS)
    if args.dry_run:  # the interpreter: fp32, tiny sizes, a short stress (64 px has 64 position blocks)
        sizes, dtype_names, stress = [32, 64], ["fp32"], dict(side=64, split=64, repeats=3)
    layouts = ("channels_last", "contiguous")
    plan = list(cases(sizes, dtype_names, layouts, config.style_layers, config.content_layers))
    results = Results(args.json, "fastnst gpu check: kernels", sizes=sizes, dtypes=dtype_names,
                      tolerances=dict(value=VALUE_TOLERANCE, grad=GRAD_TOLERANCE, stress_spread=STRESS_SPREAD,
                                      sixteen_bit=f"value + growth * ceil(P / {TENSOR_CORE_K}) * 2^-23, growth 1 "
                                                  f"(Gram), {LOSS_ERROR_GROWTH} (loss); P positions per program"))
    if not args.dry_run:  # the interpreter compiles nothing
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        results.add(precompile(sizes, dtype_names, layouts, sms))
        print(results.rows[-1], flush=True)
    stressed = set()
    for dtype_name, layout, size, layer, kind in plan:
        if dtype_name not in stressed and layout != layouts[0]:  # after the first layout of each dtype
            stressed.add(dtype_name)
            results.add(split_stress(dtype_name, device=device, **stress))
            print(results.rows[-1], flush=True)
        started = time.perf_counter()
        names = config.style_layers if kind == "grouped" else (layer,)
        xs = [features(layer_channels(name), size // layer_stride(name), DTYPES[dtype_name], layout, device)
              for name in names]
        check = {"style": check_style_layer, "content": check_content_layer}.get(kind)
        try:
            checked = check_grouped(xs, dtype_name) if kind == "grouped" else check(xs[0], dtype_name)
        except Exception as exc:  # a kernel that fails to compile or launch is a result, not the end
            checked = dict(ok=False, error=first_line(exc),
                           grad_error=float("inf"))
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = dict(kind="case", dtype=dtype_name, layout=layout, size=size, layer=layer, C=xs[0].shape[1],
                   M=xs[0].shape[2] * xs[0].shape[3], seconds=round(time.perf_counter() - started, 3), **checked)
        results.add(row)
        print(row, flush=True)
        figures(summary(results, len(plan)))
        del xs
    for dtype_name in dtype_names:  # a dtype with one layout only never reached the stress above
        if dtype_name not in stressed:
            results.add(split_stress(dtype_name, device=device, **stress))
    figures(summary(results, len(plan)))
    return 0 if all(r["ok"] for r in results.rows) else 1


if __name__ == "__main__":
    run_stage(main)
