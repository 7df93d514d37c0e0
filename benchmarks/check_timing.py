"""Stage 4 of the GPU check: seconds per L-BFGS iteration at 512, 1024 and 2048 px.

Three modes in one run, on one device: the fast path (bf16, CUDA graph, Triton), plain (fp32,
eager, the PyTorch twins) and the textbook reference, timed by ``fastnst bench`` (warm-up, then
the median of repeats on CUDA events), which rewrites its JSON after every row: a run stopped by
the stage's time limit keeps every row it finished.  The JSON is a ``fastnst bench`` result, so
``fastnst bench --report`` builds the README table from it.

    PYTHONPATH=. python3 benchmarks/check_timing.py [--json PATH] [--dry-run]
"""

from __future__ import annotations

import json

from stage_util import figures, run_stage, stage_parser

MODES = ("fast", "plain", "reference")


def summary(path) -> str:
    try:
        rows = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return "no rows measured"
    by_size: dict[int, list[str]] = {}
    for row in rows:
        value = f"{row['s_per_iter']:.4f}" if row["s_per_iter"] else row["status"]
        by_size.setdefault(row["size"], []).append(f"{row['mode']} {value}")
    return "; ".join(f"{size} px: " + ", ".join(parts) for size, parts in by_size.items()) + " s/iter"


def main() -> int:
    from fastnst.cli import main as fastnst_main

    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512", "1024", "2048"])
    args = parser.parse_args()
    if args.json is None:
        parser.error("--json is needed: the summary is read from it")
    command = ["bench", "--optimizers", "lbfgs", "--modes", *MODES, "--json", str(args.json)]
    if args.dry_run:
        command += ["--device", "cpu", "--sizes", "32", "48", "--iterations", "2", "--repeats", "1", "--warmup", "1"]
    else:
        command += ["--device", "cuda", "--sizes", *args.sizes, "--iterations", "10", "--repeats", "3",
                    "--warmup", "2"]
    code = fastnst_main(command)
    figures(summary(args.json) + (f" (bench exit {code})" if code else ""))
    return code


if __name__ == "__main__":
    run_stage(main)
