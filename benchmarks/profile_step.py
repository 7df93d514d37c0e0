"""Stage 5 of the GPU check: where a step's device time goes, kernel by kernel.

Profiles three eager bf16 L-BFGS steps at 1024 px (random weights and images, after three
warm-up steps that compile the kernels and let cuDNN choose) with torch.profiler and lists the 15
CUDA kernels with the most device time: calls, milliseconds per step and share.  Eager, because a
replayed graph hides which operation launched a kernel; the kernels and their times are the same.
On the CPU (--dry-run: fp32, 32 px) it lists operators by self CPU time instead.

    PYTHONPATH=. python3 benchmarks/profile_step.py [--json PATH] [--dry-run]
"""

from __future__ import annotations

from collections import Counter

import torch
from stage_util import Results, device_for, figures, run_stage, stage_parser

TOP = 15


def profiled_step(size: int, precision: str, device: torch.device, steps: int = 3, warmup: int = 3):
    """The profiler after ``steps`` eager steps of the fast path's objective and optimiser."""
    from torch.profiler import ProfilerActivity, profile

    from fastnst.config import StyleConfig
    from fastnst.run import build_run, resolve_runtime, synthetic_inputs

    config = StyleConfig(size=size, weights="random", precision=precision, cuda_graph=False, quiet=True)
    run = build_run(resolve_runtime(config, device), config, synthetic_inputs(size, device))
    for _ in range(warmup):
        run.step(run.image)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run.step(run.image)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof


def top_kernels(prof, device: torch.device, steps: int, top: int = TOP) -> tuple[list[dict], float]:
    """The ``top`` kernels (CUDA) or operators (CPU, self time) and the busy time per step in ms."""
    from torch.autograd import DeviceType

    totals, calls = Counter(), Counter()
    if device.type == "cuda":
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us()
                calls[event.name] += 1
        if not totals:  # a profiler that keeps kernels only inside the operators' averages
            for average in prof.key_averages():
                self_device = (getattr(average, "self_device_time_total", 0)
                               or getattr(average, "self_cuda_time_total", 0))
                if self_device:
                    totals[average.key] += self_device
                    calls[average.key] += average.count
    else:
        for average in prof.key_averages():
            totals[average.key] += average.self_cpu_time_total
            calls[average.key] += average.count
    busy_us = sum(totals.values())
    rows = [dict(rank=rank, name=name[:160], calls_per_step=calls[name] / steps,
                 ms_per_step=total / steps / 1e3, share=total / busy_us if busy_us else 0.0)
            for rank, (name, total) in enumerate(totals.most_common(top), start=1)]
    return rows, busy_us / steps / 1e3


def table(rows: list[dict]) -> str:
    lines = [f"{'#':>2} {'ms/step':>8} {'share':>6} {'calls':>6}  kernel"]
    lines += [f"{r['rank']:>2} {r['ms_per_step']:8.3f} {r['share']:6.1%} {r['calls_per_step']:6.1f}  {r['name']}"
              for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = device_for(args.dry_run)
    size, precision = (args.size, "bf16") if not args.dry_run else (32, "fp32")
    prof = profiled_step(size, precision, device, args.steps)
    rows, busy_ms = top_kernels(prof, device, args.steps)
    results = Results(args.json, "fastnst gpu check: profile", size=size, precision=precision, steps=args.steps,
                      optimizer="lbfgs", graphed=False, busy_ms_per_step=busy_ms,
                      timed=("CUDA kernels, device time" if device.type == "cuda" else "CPU operators, self time"))
    for row in rows:
        results.add(row)
    print(table(rows), flush=True)
    leaders = ", ".join(f"{r['name'][:48]} {r['share']:.0%}" for r in rows[:4])
    figures(f"{size} px {precision}: busy {busy_ms:.2f} ms/step; top: {leaders}")
    return 0


if __name__ == "__main__":
    run_stage(main)
