"""Stage 4 of the GPU check: seconds per L-BFGS iteration at 512, 1024 and 2048 px.

Three modes in one run, on one device: the fast path (bf16, CUDA graph, Triton), plain (fp32,
eager, the PyTorch twins) and the textbook reference, timed by ``fastnst bench`` (warm-up, then
the median of repeats on CUDA events), which rewrites its JSON after every row: a run stopped by
the stage's time limit keeps every row it finished.  Then the fast path with Adam at the same
sizes, whose rows are merged into the same file with the L-BFGS share of a step (L-BFGS step
minus Adam step, ``lbfgs_cost``).  The JSON is a ``fastnst bench`` result, so ``fastnst bench
--report`` builds the README table from it.

    PYTHONPATH=. python3 benchmarks/check_timing.py [--json PATH] [--dry-run]
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from stage_util import figures, run_stage, stage_parser

MODES = ("fast", "plain", "reference")


def _rows(path) -> list[dict]:
    try:
        return json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return []


def lbfgs_shares(path) -> str:
    """The L-BFGS share of the fast step per size, from the merged result's ``lbfgs_cost``."""
    try:
        costs = json.loads(path.read_text()).get("lbfgs_cost", [])
    except (OSError, ValueError):
        return ""
    shares = [f"{c['size']} px {c['share']:+.1%}" for c in costs if c["mode"] == "fast"]
    return "; L-BFGS share of the fast step: " + ", ".join(shares) if shares else ""


def summary(path) -> str:
    rows = _rows(path)
    if not rows:
        return "no rows measured"
    by_size: dict[int, list[str]] = {}
    for row in rows:
        value = f"{row['s_per_iter']:.4f}" if row["s_per_iter"] else row["status"]
        label = row["mode"] if row["optimizer"] == "lbfgs" else f"{row['optimizer']} {row['mode']}"
        by_size.setdefault(row["size"], []).append(f"{label} {value}")
    return "; ".join(f"{size} px: " + ", ".join(parts) for size, parts in by_size.items()) + " s/iter"


def merge_adam_rows(path: Path, adam_path: Path) -> None:
    """Append the Adam rows to the L-BFGS result and recompute what L-BFGS costs beyond Adam."""
    from fastnst.bench import BenchRow, lbfgs_costs
    from fastnst.files import atomic_write

    document = json.loads(path.read_text())
    document["results"] += _rows(adam_path)
    fields = {f.name for f in dataclasses.fields(BenchRow)}
    rows = [BenchRow(**{k: v for k, v in row.items() if k in fields}) for row in document["results"]]
    document["lbfgs_cost"] = lbfgs_costs(rows)
    text = json.dumps(document, indent=1) + "\n"
    atomic_write(path, lambda stream: stream.write(text.encode()))


def main() -> int:
    from fastnst.cli import main as fastnst_main

    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512", "1024", "2048"])
    args = parser.parse_args()
    if args.json is None:
        parser.error("--json is needed: the summary is read from it")
    if args.dry_run:
        common = ["--device", "cpu", "--sizes", "32", "48", "--iterations", "2", "--repeats", "1", "--warmup", "1"]
    else:
        common = ["--device", "cuda", "--sizes", *args.sizes, "--iterations", "10", "--repeats", "3", "--warmup", "2"]
    code = fastnst_main(["bench", "--optimizers", "lbfgs", "--modes", *MODES, "--json", str(args.json), *common])
    figures(summary(args.json) + (f" (bench exit {code})" if code else ""))
    # The Adam rows go to a scratch folder first (the returned folder holds only what comes back).
    adam_json = Path(tempfile.mkdtemp()) / "adam.json"
    adam_code = fastnst_main(["bench", "--optimizers", "adam", "--modes", "fast", "--json", str(adam_json), *common])
    if _rows(args.json) and _rows(adam_json):
        merge_adam_rows(args.json, adam_json)
    figures(summary(args.json) + lbfgs_shares(args.json)
            + (f" (bench exit {code}, {adam_code})" if code or adam_code else ""))
    return code or adam_code


if __name__ == "__main__":
    run_stage(main)
