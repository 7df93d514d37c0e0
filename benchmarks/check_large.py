"""A stage of gpu_check_more.sh: large images, end to end through the Python API.

- 2048 px with fp16 and loss scaling, 30 L-BFGS iterations, untiled: seconds per iteration, steps
  skipped for overflow, first and last loss (every loss read back must be finite);
- 8192 px, 10 Adam iterations, ``--tile auto``: the tile the planner picks, seconds per iteration,
  peak memory.

Random weights, the bundled Tübingen photo and Starry Night, upscaled; no image is written (an
8192 px result would pass the size of a file the GPU machine returns).  A dry run does the same at
64 px (fp32) and 96 px with 64 px tiles, on the CPU.

    PYTHONPATH=. python3 benchmarks/check_large.py [--json PATH] [--dry-run]
"""

from __future__ import annotations

import math
from pathlib import Path

from stage_util import Results, device_for, figures, first_line, run_stage, stage_parser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def render_row(label: str, **options) -> dict:
    from fastnst import render

    result = render(EXAMPLES / "tubingen.jpg", EXAMPLES / "starry_night.jpg", weights="random", quiet=True,
                    report_every=1, **options)
    losses = [loss for _, loss in result.losses]
    return dict(run=label, size=options["size"], optimizer=options.get("optimizer", "lbfgs"),
                precision=result.precision, tile=result.tile, iterations=result.iterations,
                s_per_iter=result.seconds / max(result.iterations, 1), skipped_steps=result.skipped_steps,
                first_loss=losses[0] if losses else None, last_loss=result.loss,
                peak_memory_gib=(result.peak_memory_bytes or 0) / 2**30,
                ok=bool(losses) and all(math.isfinite(loss) for loss in losses))


def describe(row: dict) -> str:
    tile = f", tile {row['tile']} px" if row["tile"] else ""
    return (f"{row['run']}: {row['s_per_iter']:.3f} s/iter{tile}, {row['skipped_steps']} skipped, loss "
            f"{row['first_loss']:.4g} -> {row['last_loss']:.4g}, peak {row['peak_memory_gib']:.1f} GiB"
            + ("" if row["ok"] else " FAIL (non-finite loss)"))


def main() -> int:
    args = stage_parser(__doc__.splitlines()[0]).parse_args()
    device = device_for(args.dry_run)
    if args.dry_run:
        runs = [("64 px fp32 lbfgs (dry run)", dict(size=64, iterations=3, precision="fp32")),
                ("96 px adam, 64 px tiles (dry run)", dict(size=96, iterations=2, optimizer="adam", tile="64"))]
    else:
        runs = [("2048 px fp16 lbfgs", dict(size=2048, iterations=30, precision="fp16")),
                ("8192 px adam, tile auto", dict(size=8192, iterations=10, optimizer="adam", tile="auto"))]
    results = Results(args.json, "fastnst gpu check: large images")
    for label, options in runs:
        try:
            row = render_row(label, device=str(device), **options)
        except Exception as exc:  # out of memory or a failed launch is a result to bring back
            row = dict(run=label, ok=False, error=first_line(exc))
        results.add(row)
        print(row, flush=True)
        figures("; ".join(describe(r) if "error" not in r else f"{r['run']}: {r['error']}" for r in results.rows))
    return 0 if all(r["ok"] for r in results.rows) else 1


if __name__ == "__main__":
    run_stage(main)
