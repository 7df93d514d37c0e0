"""Batch benchmark: images/s of ``fastnst batch`` against a loop of single renders.

Both render the same jobs (N random content images of one size, one style, random weights) with
the same options; the loop calls the Python API once per job, as a user without batch mode would.
Wall-clock seconds include everything a user waits for (targets, warm-up, writing images).

    PYTHONPATH=. python benchmarks/bench_batch.py [--size 256] [--jobs 4] [--iterations 10]
        [--batch-size 4] [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch-size", default="4")
    parser.add_argument("--optimizer", default="lbfgs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from fastnst import StyleConfig, render, save_image
    from fastnst import batch as batching
    from fastnst.config import BatchConfig
    from fastnst.devices import run_metadata

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rng = np.random.default_rng(0)
        for i in range(args.jobs):
            pixels = rng.integers(0, 256, (args.size * 3 // 4, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{i:03d}.png")
        style = str(EXAMPLES / "starry_night.jpg")
        config = StyleConfig(weights="random", size=args.size, iterations=args.iterations, device=args.device,
                             optimizer=args.optimizer, quiet=True)

        start = time.perf_counter()
        for i in range(args.jobs):
            save_image(render(folder / f"c{i:03d}.png", style, config).image, folder / f"single{i:03d}.png")
        single_seconds = time.perf_counter() - start

        settings = BatchConfig(content=(str(folder / "c*.png"),), style=(style,), out=str(folder / "out"),
                               batch_size=args.batch_size).validate()
        (folder / "out").mkdir()
        jobs = batching.jobs_from_pairs(settings, config)
        start = time.perf_counter()
        summary = batching.run_batch(jobs, settings, torch.device(args.device), notify=lambda m: None,
                                     progress=False)
        batch_seconds = time.perf_counter() - start
        assert len(summary.done) == args.jobs, summary.failed

    result = {"meta": run_metadata(), "size": args.size, "jobs": args.jobs, "iterations": args.iterations,
              "optimizer": args.optimizer, "batch_size": args.batch_size, "device": args.device,
              "single_loop_images_per_second": args.jobs / single_seconds,
              "batch_images_per_second": args.jobs / batch_seconds,
              "speedup": single_seconds / batch_seconds}
    print(f"{args.jobs} jobs at {args.size} px, {args.iterations} {args.optimizer} iterations on {args.device}: "
          f"single renders {result['single_loop_images_per_second']:.3f} images/s, batch (size "
          f"{args.batch_size}) {result['batch_images_per_second']:.3f} images/s: {result['speedup']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
