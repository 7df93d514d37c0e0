"""What the stages of gpu_check.sh and gpu_check_more.sh share.

Each stage is a script that prints ``FIGURES <one line>`` whenever its headline numbers change
(the shell script puts the last such line into ``summary.txt``, so a stage stopped by its time
limit still reports what it measured) and rewrites its JSON file after every result.  SIGINT and
SIGTERM raise KeyboardInterrupt even when the stage was started with SIGINT ignored, as a
background job of a non-interactive shell is: the shell stops stages with ``timeout -s INT``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, help="write the results here, rewritten after every result")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU (Triton interpreter, fp32): checks the script, not the GPU")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interruptible() -> None:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def figures(text: str) -> None:
    print(f"FIGURES {text}", flush=True)


def device_for(dry_run: bool) -> torch.device:
    """CUDA for a real check; the CPU (kernels interpreted) for a dry run."""
    if dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on a machine without a GPU")
    return torch.device("cuda")


class Results:
    """A JSON document {kind, meta, ..., results: [...]} saved atomically after every ``add``."""

    def __init__(self, path: Path | None, kind: str, **fields):
        from fastnst.devices import run_metadata

        self.path = path
        self.document = {"kind": kind, "meta": run_metadata(), **fields, "results": []}
        self.save()

    @property
    def rows(self) -> list[dict]:
        return self.document["results"]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.document, indent=1, default=str) + "\n")
        os.replace(temporary, self.path)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64; inf when actual holds NaN (unwritten)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def run_stage(main) -> None:
    """Run a stage's main(); Ctrl-C or the time limit ends it with status 130, results kept."""
    interruptible()
    try:
        code = main()
    except KeyboardInterrupt:
        print("stage interrupted (time limit): the results so far are saved", flush=True)
        code = 130
    sys.exit(code)
