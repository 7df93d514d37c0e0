"""Benchmark harness: seconds per iteration of fastnst, its ablations and the textbook reference.

Timing is correct by construction: the run is the one real runs use (``run.build_run``), it is
warmed up before the clock starts, CUDA work is timed with CUDA events after a synchronise (the CPU
with a monotonic clock), and each figure is the median of several repeats with the spread shown.
"Model TFLOP/s" is the cost model's count (``measure.model_flops``) over the measured time,
whatever shortcut (symmetric Grams) the implementation takes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .config import StyleConfig
from .measure import MemoryModel, free_bytes, model_flops, peak_bytes, reset_peak
from .run import (buffer_bytes_per_pixel, build_run, resolve_runtime, resolve_settings, synthetic_inputs,
                  time_run, time_steps)

# Published per-iteration times, with their sources (../shared/reference/baselines.md).
PUBLISHED = (
    dict(gpu="Tesla K40", size=512, optimizer="lbfgs", s_per_iter=None,
         source="Gatys et al., CVPR 2016, sec. 5: 'up to an hour' to convergence at ~512 x 512; "
                "no per-iteration time published"),
    dict(gpu="GTX Titan X (Maxwell)", size=256, optimizer="lbfgs", s_per_iter=3.17 / 100,
         source="Johnson, Alahi & Fei-Fei, ECCV 2016, Table 1 (3.17 s / 100 iterations)"),
    dict(gpu="GTX Titan X (Maxwell)", size=512, optimizer="lbfgs", s_per_iter=10.97 / 100,
         source="Johnson, Alahi & Fei-Fei, ECCV 2016, Table 1 (10.97 s / 100 iterations)"),
    dict(gpu="GTX Titan X (Maxwell)", size=1024, optimizer="lbfgs", s_per_iter=42.89 / 100,
         source="Johnson, Alahi & Fei-Fei, ECCV 2016, Table 1 (42.89 s / 100 iterations)"),
    dict(gpu="GTX Titan X (Maxwell)", size=512, optimizer="adam", s_per_iter=44 / 500,
         source="jcjohnson/neural-style README, cudnn+autotune+adam, 44 s / 500 iterations"),
    dict(gpu="GTX Titan X (Pascal)", size=512, optimizer="lbfgs", s_per_iter=30 / 500,
         source="jcjohnson/neural-style README, cudnn+autotune+lbfgs, 30 s / 500 iterations"),
    dict(gpu="GTX Titan X (Pascal)", size=512, optimizer="adam", s_per_iter=22 / 500,
         source="jcjohnson/neural-style README, cudnn+autotune+adam, 22 s / 500 iterations"),
)


def published_for(size: int, optimizer: str) -> list[dict]:
    return [p for p in PUBLISHED if p["size"] == size and p["optimizer"] == optimizer]


@dataclass(frozen=True)
class Timing:
    """How each figure is taken: ``warmup`` untimed steps, then the median of ``repeats`` timed runs
    of ``iterations`` steps."""

    iterations: int = 20
    repeats: int = 5
    warmup: int = 3


@dataclass
class StepTiming:
    size: int
    precision: str
    cuda_graph: bool
    optimizer: str
    backend: str
    seconds_per_iteration: float  # median over repeats
    spread: tuple[float, float]  # (min, max) over repeats
    model_tflops: float
    peak_memory_bytes: int | None


@dataclass
class BenchRow:
    size: int
    optimizer: str
    mode: str  # fast | fp32 | eager | torch | reference
    status: str = "ok"  # or why the row was not measured
    s_per_iter: float | None = None
    spread: tuple[float, float] | None = None
    speedup_vs_reference: float | None = None
    model_tflops: float | None = None
    peak_memory_bytes: int | None = None
    precision: str | None = None
    cuda_graph: bool | None = None
    backend: str | None = None
    published: list[dict] = field(default_factory=list)  # with our speed-up over each


# --------------------------------------------------------------------------------------------
# Timing


def time_step(size: int, *, config: StyleConfig | None = None, device: str = "cuda", timing: Timing = Timing(),
              **overrides) -> StepTiming:
    """Seconds per iteration of fastnst's run on a size x size image (random weights and images:
    speed does not depend on them).  ``config`` (default StyleConfig()) with ``overrides`` gives
    the objective, optimiser, precision, graph and backend."""
    config = (config or StyleConfig()).replace(size=size, **overrides)
    dev = torch.device(device)
    reset_peak(dev)
    runtime = resolve_runtime(config, dev, weights="random")
    run = build_run(runtime, config, synthetic_inputs(size, dev))
    seconds, spread = time_run(run, timing.iterations, timing.repeats, timing.warmup)
    return StepTiming(size=size, precision=runtime.precision, cuda_graph=run.graphed, optimizer=config.optimizer,
                      backend=runtime.backend, seconds_per_iteration=seconds, spread=spread,
                      model_tflops=model_flops(size, size) / seconds / 1e12, peak_memory_bytes=peak_bytes(dev))


def time_reference(size: int, *, optimizer: str = "lbfgs", device: str = "cuda", timing: Timing = Timing()
                   ) -> StepTiming:
    """Seconds per iteration of the textbook reference (fastnst/reference_gatys.py)."""
    from . import reference_gatys as textbook
    from .vgg import random_state_dict

    config = StyleConfig()
    dev = torch.device(device)
    reset_peak(dev)
    inputs = synthetic_inputs(size, dev)
    model, style_losses, content_losses = textbook.build_model(
        random_state_dict(0), inputs.content, inputs.styles[0], config.content_layers, config.style_layers,
        config.pooling)
    start = torch.rand(inputs.content.shape, generator=torch.Generator().manual_seed(1))
    image = start.to(dev).requires_grad_(True)
    step = textbook.make_step(model, style_losses, content_losses, image, textbook.make_optimizer(optimizer, image))
    for _ in range(timing.warmup):
        step()
    seconds, spread = time_steps(step, dev, timing.iterations, timing.repeats)
    return StepTiming(size=size, precision="fp32", cuda_graph=False, optimizer=optimizer, backend="torch",
                      seconds_per_iteration=seconds, spread=spread,
                      model_tflops=model_flops(size, size) / seconds / 1e12, peak_memory_bytes=peak_bytes(dev))


def estimated_peak(size: int, mode: str, optimizer: str, device: torch.device) -> float:
    """The planner's memory model stated from the cost model alone (no measurement), to refuse
    sizes that cannot fit before trying them; the textbook reference keeps two activation copies."""
    settings = {"precision": "fp32"} if mode == "reference" else _mode_settings(mode)
    config = StyleConfig(optimizer=optimizer).replace(**settings)
    element = 4 if resolve_settings(config, device).precision == "fp32" else 2
    prior = MemoryModel.prior(buffer_bytes_per_pixel(config), element, copies=2 if mode == "reference" else 1)
    return prior.untiled_peak(size, size)


# --------------------------------------------------------------------------------------------
# The table


def _mode_settings(mode: str) -> dict:
    """StyleConfig changes of each mode relative to the fast path (the defaults)."""
    return {"fast": {}, "fp32": {"precision": "fp32"}, "eager": {"cuda_graph": False},
            "torch": {"backend": "torch"},
            "plain": {"precision": "fp32", "cuda_graph": False, "backend": "torch"}}[mode]


def resolved_mode(mode: str, device: torch.device):
    """What a fastnst mode amounts to on ``device``: its resolved precision, kernels and graph use."""
    return resolve_settings(StyleConfig().replace(**_mode_settings(mode)), device)


def bench_rows(sizes, optimizers, modes, device: torch.device, timing: Timing, progress=print,
               on_row=None) -> list[BenchRow]:
    """Time every (size, optimizer, mode); ablations equal to the fast path on this device are
    listed as such instead of being timed twice.  ``on_row(rows)`` is called after every row, so
    a caller can save what is measured before a long run ends (or is interrupted)."""
    on_row = on_row or (lambda rows: None)
    rows: list[BenchRow] = []
    fast = resolved_mode("fast", device) if "fast" in modes else None
    for size in sizes:
        for optimizer in optimizers:
            group = []
            for mode in modes:
                row = BenchRow(size=size, optimizer=optimizer, mode=mode)
                rows.append(row)
                group.append(row)
                _measure(row, fast, device, timing, progress)
                on_row(rows)
            reference = next((r.s_per_iter for r in group if r.mode == "reference" and r.s_per_iter), None)
            if reference:
                for row in group:
                    if row.s_per_iter:
                        row.speedup_vs_reference = reference / row.s_per_iter
                on_row(rows)
    return rows


def _measure(row: BenchRow, fast, device: torch.device, timing: Timing, progress) -> None:
    """Time one row in place, or say in its status why it was not timed (``fast``: what the fast
    path amounts to on this device when it is timed too, so an equal ablation is not timed twice)."""
    label = f"{row.size} px {row.optimizer} {row.mode}"
    if fast is not None and row.mode not in ("reference", "fast") and resolved_mode(row.mode, device) == fast:
        row.status = f"same as fast on {device.type}"
        return
    need, free = estimated_peak(row.size, row.mode, row.optimizer, device), free_bytes(device)
    if free is not None and need > free:
        row.status = f"does not fit: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        progress(f"{label}: {row.status}")
        return
    try:
        measured = _time_mode(row.mode, row.size, row.optimizer, device, timing)
    except torch.cuda.OutOfMemoryError:
        row.status = "does not fit: out of memory"
        reset_peak(device)
        progress(f"{label}: {row.status}")
        return
    _fill(row, measured)
    progress(f"{label}: {measured.seconds_per_iteration:.4f} s/iter")


def _time_mode(mode: str, size: int, optimizer: str, device: torch.device, timing: Timing) -> StepTiming:
    if mode == "reference":
        return time_reference(size, optimizer=optimizer, device=str(device), timing=timing)
    # time_step starts from StyleConfig(), the fast path; the mode switches features off.
    return time_step(size, optimizer=optimizer, device=str(device), timing=timing, **_mode_settings(mode))


def _fill(row: BenchRow, timing: StepTiming) -> None:
    row.s_per_iter = timing.seconds_per_iteration
    row.spread = timing.spread
    row.model_tflops = timing.model_tflops
    row.peak_memory_bytes = timing.peak_memory_bytes
    row.precision, row.cuda_graph, row.backend = timing.precision, timing.cuda_graph, timing.backend
    row.published = [dict(p, speedup=(p["s_per_iter"] / timing.seconds_per_iteration if p["s_per_iter"] else None))
                     for p in published_for(row.size, row.optimizer)]


def headline(rows: list[BenchRow]) -> dict | None:
    """Megapixel-iterations per second of the fast path with the first optimiser, at 1024 px when
    measured, else at the largest size measured (labelled as such)."""
    fast = [r for r in rows if r.mode == "fast" and r.s_per_iter]
    if not fast:
        return None
    first_optimizer = fast[0].optimizer
    fast = [r for r in fast if r.optimizer == first_optimizer]
    chosen = next((r for r in fast if r.size == 1024), max(fast, key=lambda r: r.size))
    return {"size": chosen.size, "optimizer": chosen.optimizer,
            "megapixel_iterations_per_second": chosen.size**2 / 1e6 / chosen.s_per_iter,
            "s_per_iter": chosen.s_per_iter}


def lbfgs_costs(rows: list[BenchRow]) -> list[dict]:
    """What L-BFGS costs per step beyond Adam, for every (size, mode) timed with both: the step
    with L-BFGS minus the step with Adam (the history update and the H g product against Adam's
    moments), in seconds and as a share of the L-BFGS step."""
    timed = {(r.size, r.mode, r.optimizer): r.s_per_iter for r in rows if r.s_per_iter}
    costs = []
    for (size, mode, optimizer), lbfgs in timed.items():
        adam = timed.get((size, mode, "adam"))
        if optimizer == "lbfgs" and adam is not None:
            costs.append({"size": size, "mode": mode, "lbfgs_s_per_iter": lbfgs, "adam_s_per_iter": adam,
                          "lbfgs_extra_s": lbfgs - adam, "share": (lbfgs - adam) / lbfgs})
    return costs


def format_lbfgs_costs(costs: list[dict]) -> str:
    return "\n".join(f"L-BFGS beyond Adam, {c['size']} px {c['mode']}: {c['lbfgs_extra_s'] * 1e3:+.2f} ms/iter "
                     f"({c['share']:+.1%} of the L-BFGS step)" for c in costs)


def format_table(rows: list[BenchRow]) -> str:
    lines = [f"{'size':>5} {'opt':5} {'mode':9} {'s/iter':>9} {'spread':>19} {'vs ref':>7} {'TFLOP/s':>8} "
             f"{'peak MiB':>9}  published"]
    for r in rows:
        if r.s_per_iter is None:
            lines.append(f"{r.size:>5} {r.optimizer:5} {r.mode:9} {'-':>9} {r.status}")
            continue
        spread = f"[{r.spread[0]:.4f}, {r.spread[1]:.4f}]"
        versus = f"{r.speedup_vs_reference:.2f}x" if r.speedup_vs_reference else "-"
        memory = f"{r.peak_memory_bytes / 2**20:.0f}" if r.peak_memory_bytes else "-"
        published = "; ".join(f"{p['gpu']} {p['s_per_iter']:.3f} s ({p['speedup']:.1f}x)" if p["s_per_iter"]
                              else f"{p['gpu']}: no per-iteration figure" for p in r.published)
        lines.append(f"{r.size:>5} {r.optimizer:5} {r.mode:9} {r.s_per_iter:9.4f} {spread:>19} {versus:>7} "
                     f"{r.model_tflops:8.2f} {memory:>9}  {published}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Largest image per mode


def fits(mode: str, size: int, device: torch.device, optimizer: str = "lbfgs") -> bool:
    """Whether a real run of ``mode`` at ``size`` survives two iterations on ``device``.

    Out of memory is the usual failure; at extreme sizes cuDNN or a kernel may refuse instead
    (allocation failures inside cuDNN, 32-bit index limits, a launcher's ValueError for features
    beyond what one launch indexes), which equally means "does not fit".
    """
    try:
        _time_mode(mode, size, optimizer, device, Timing(iterations=1, repeats=1, warmup=1))
        return True
    except (RuntimeError, ValueError):  # torch.cuda.OutOfMemoryError is a RuntimeError
        return False
    finally:
        reset_peak(device)


def max_size(mode: str, device: torch.device, start: int = 1024, limit: int = 32768, step: int = 64,
             progress=print) -> int | None:
    """The largest square size (a multiple of ``step``) that fits: doubling, then bisection."""
    good, bad = None, None
    size = start
    while size <= limit:
        ok = fits(mode, size, device)
        progress(f"max size {mode}: {size} px {'fits' if ok else 'does not fit'}")
        if not ok:
            bad = size
            break
        good, size = size, size * 2
    if good is None:
        size = start // 2
        while size >= step and not fits(mode, size, device):
            size //= 2
        if size < step:
            return None
        good, bad = size, size * 2
    if bad is None:
        return good  # fits up to the limit
    while bad - good > step:
        middle = (good + bad) // 2 // step * step
        if fits(mode, middle, device):
            good = middle
        else:
            bad = middle
        progress(f"max size {mode}: between {good} and {bad} px")
    return good


def as_json(rows: list[BenchRow], bench_config, max_sizes: dict | None) -> dict:
    from .devices import run_metadata

    return {"kind": "fastnst bench", "meta": run_metadata(), "config": dataclasses.asdict(bench_config),
            "headline": headline(rows), "results": [dataclasses.asdict(r) for r in rows],
            "lbfgs_cost": lbfgs_costs(rows),
            "max_size": max_sizes, "published": list(PUBLISHED),
            "cost_model": {"flops_per_pixel": model_flops(1, 1),
                           "source": "../shared/reference/baselines.md"}}
