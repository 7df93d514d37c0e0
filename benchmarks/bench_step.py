"""Step benchmark: seconds per iteration of the whole step in the modes that matter.

For each size (default 512, 1024, 2048) it times fp32-eager, bf16-eager and bf16-graph L-BFGS
steps (``fastnst.bench.time_step``: CUDA events, median of repeats) and reports model TFLOP/s
from the cost model of ``../shared/reference/baselines.md`` and peak memory.  ``--profile``
adds a torch.profiler summary of a few eager bf16 steps at 1024 px: which kernels dominate.

    PYTHONPATH=. python benchmarks/bench_step.py [--sizes 512 1024 2048] [--json PATH] [--profile]

Without CUDA it prints that it was skipped and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

MODES = {"fp32-eager": ("fp32", False), "bf16-eager": ("bf16", False), "bf16-graph": ("bf16", True)}
# Gatys et al. with L-BFGS on a GTX Titan X (Maxwell), Johnson, Alahi & Fei-Fei, ECCV 2016,
# Table 1 (via baselines.md): seconds per iteration by image side.
TITAN_X_S_PER_ITER = {256: 0.032, 512: 0.110, 1024: 0.429}


def profile_summary(size: int = 1024, steps: int = 5) -> str:
    """The top kernels by CUDA time over a few eager bf16 steps (profile_step.py's table)."""
    from profile_step import profiled_step, table, top_kernels

    device = torch.device("cuda")
    rows, busy_ms = top_kernels(profiled_step(size, "bf16", device, steps), device, steps)
    return f"{size} px bf16, eager: device busy {busy_ms:.3f} ms/step\n" + table(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--iterations", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results and their provenance here")
    parser.add_argument("--profile", action="store_true", help="print a profiler summary at 1024 px")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: step benchmark skipped")
        return 0
    from fastnst.bench import Timing, time_step
    from fastnst.devices import run_metadata

    rows = []
    print(f"{'size':>5} {'mode':11} {'kernels':7} {'s/iter':>9} {'spread':>19} {'TFLOP/s':>8} "
          f"{'peak MiB':>9} {'vs Titan X':>10}")
    for size in args.sizes:
        for mode in args.modes:
            precision, graph = MODES[mode]
            timing = time_step(size, precision=precision, cuda_graph=graph,
                               timing=Timing(iterations=args.iterations, repeats=args.repeats))
            row = dict(mode=mode, **dataclasses.asdict(timing))
            titan = TITAN_X_S_PER_ITER.get(size)
            row["speedup_vs_titan_x_maxwell"] = titan / timing.seconds_per_iteration if titan else None
            rows.append(row)
            low, high = timing.spread
            versus = f"{row['speedup_vs_titan_x_maxwell']:.0f}x" if titan else "-"
            print(f"{size:>5} {mode:11} {timing.backend:7} {timing.seconds_per_iteration:9.5f} "
                  f"[{low:.5f}, {high:.5f}] {timing.model_tflops:8.1f} "
                  f"{(timing.peak_memory_bytes or 0) / 2**20:9.0f} {versus:>10}", flush=True)
    profile = profile_summary() if args.profile else None
    if profile:
        print(profile)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": run_metadata(), "results": rows, "profile": profile},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
