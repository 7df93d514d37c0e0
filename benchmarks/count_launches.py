"""Launches per optimisation step, batch of 1 against batch of N: does batching add launches?

A launch is a CUDA kernel on the GPU; on the CPU, an operator that computes something and calls
no other operator that does (``_works``), the CPU's unit of dispatched work: views, allocations
and other metadata operators (``NO_WORK``), which launch nothing on a GPU either, are not counted.
One eager step of the fast path is profiled after warm-up steps (a CUDA graph replays the same
kernels, but hides them from the profiler), with per-sample style targets, as ``fastnst batch``
renders them.

    PYTHONPATH=. python3 benchmarks/count_launches.py [--device cpu] [--size 64] [--batches 1 8]
        [--optimizers lbfgs adam] [--precision auto] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

NO_WORK = frozenset(f"aten::{name}" for name in (
    "as_strided", "as_strided_", "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "slice", "select",
    "unsqueeze", "squeeze", "t", "transpose", "permute", "alias", "detach", "resolve_conj", "resolve_neg",
    "empty", "empty_strided", "empty_like", "resize_", "to", "lift_fresh", "diagonal", "unbind", "split",
    "narrow", "numpy_T", "mT", "contiguous", "result_type"))


def _step_run(size: int, batch: int, optimizer: str, device: torch.device, precision: str):
    from fastnst.config import StyleConfig
    from fastnst.run import Inputs, build_run, resolve_runtime, synthetic_inputs

    config = StyleConfig(size=size, weights="random", optimizer=optimizer, cuda_graph=False, quiet=True,
                         precision=precision)
    one = synthetic_inputs(size, device)
    g = torch.Generator().manual_seed(1)
    styles = [[torch.rand(one.styles[0].shape, generator=g).to(device)] for _ in range(batch)]
    inputs = Inputs(content=one.content.repeat(batch, 1, 1, 1), styles=styles)
    return build_run(resolve_runtime(config, device), config, inputs)


def launches_per_step(size: int, batch: int, optimizer: str, device: torch.device, precision: str = "auto",
                      warmup: int = 2) -> int:
    """Kernels (CUDA) or leaf operators (CPU) in one eager step of a batch of ``batch`` images."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run = _step_run(size, batch, optimizer, device, precision)
    for _ in range(warmup):
        run.step(run.image)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run.step(run.image)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        return sum(1 for event in events if event.device_type == DeviceType.CUDA)
    return sum(1 for event in events if _works(event) and not any(map(_does_work, event.cpu_children)))


def _works(event) -> bool:
    return event.name.startswith("aten::") and event.name not in NO_WORK


def _does_work(event) -> bool:
    """Whether ``event`` or anything it calls computes (a view may call a copy)."""
    return _works(event) or any(map(_does_work, event.cpu_children))


def count(size: int, batches: list[int], optimizers: list[str], device: torch.device, precision: str
          ) -> list[dict]:
    rows = []
    for optimizer in optimizers:
        counts = {batch: launches_per_step(size, batch, optimizer, device, precision) for batch in batches}
        rows.append({"optimizer": optimizer, "size": size, "precision": precision, "launches": counts,
                     "ratio": counts[batches[-1]] / counts[batches[0]]})
    return rows


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main() -> int:
    from fastnst.config import OPTIMIZERS, PRECISIONS
    from fastnst.devices import resolve_device
    from fastnst.errors import FastNSTError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--size", type=_positive, default=64, help="square image side in px (default: 64)")
    parser.add_argument("--batches", type=_positive, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--json", type=Path, help="write the counts with device, versions and commit here")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except FastNSTError as exc:
        parser.error(str(exc))
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json: folder '{args.json.parent}' does not exist")
    rows = count(args.size, args.batches, args.optimizers, device, args.precision)
    lines = []
    for row in rows:
        counts = ", ".join(f"batch {b}: {n}" for b, n in row["launches"].items())
        lines.append(f"{row['optimizer']} at {row['size']} px on {device.type}: {counts} launches per step "
                     f"(x{row['ratio']:.2f})")
    print("\n".join(lines))
    print("FIGURES " + "; ".join(lines), flush=True)  # the GPU check's summary line
    if args.json:
        from fastnst.devices import run_metadata
        from fastnst.files import atomic_write

        document = {"kind": "fastnst launches per step", "meta": run_metadata(),
                    "unit": "CUDA kernels" if device.type == "cuda" else "CPU leaf operators", "results": rows}
        text = json.dumps(document, indent=1) + "\n"
        atomic_write(args.json, lambda stream: stream.write(text.encode()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
