"""Does L-BFGS move when the loss is small?  The stall case of issue 15, measured.

torchvision's own initialisation of VGG19 (``vgg19(weights=None)``, seeded; fan-out He normal)
gives activations, hence losses and gradients, far smaller than trained weights do.  With torch's
step rule (first step lr min(1, 1/|g|_1), curvature pairs kept when s.y > 1e-10) fp32 L-BFGS
barely moves on it (0.3813 -> 0.3810 in 20 iterations at 512 px).  This script renders Tübingen x
Starry Night (examples/) with those weights for each step rule and precision, and writes each run's
losses as JSON lines plus a summary:

    python benchmarks/check_lbfgs_scale.py --out benchmarks/results/<folder> [--size 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torchvision.models import vgg19

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastnst import render  # noqa: E402
from fastnst.files import atomic_write  # noqa: E402


def torchvision_initialised_weights(path: Path, seed: int = 0) -> Path:
    """The features of a freshly initialised torchvision VGG19 (torch.manual_seed(seed))."""
    torch.manual_seed(seed)
    state = vgg19(weights=None).state_dict()
    torch.save({key: value for key, value in state.items() if key.startswith("features.")}, path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the loss logs and summary.json")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rules", nargs="+", default=["bounded", "torch"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    with tempfile.TemporaryDirectory() as folder:
        weights = torchvision_initialised_weights(Path(folder) / "vgg19-torchvision-init.pth")
        for rule in args.rules:
            for precision in args.precisions:
                log = out / f"lbfgs-{rule}-{precision}-{args.size}px.jsonl"
                log.unlink(missing_ok=True)
                render(ROOT / "examples" / "tubingen.jpg", ROOT / "examples" / "starry_night.jpg",
                       weights=str(weights), size=args.size, iterations=args.iterations, precision=precision,
                       lbfgs_steps=rule, device=args.device, quiet=True, log=str(log))
                losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
                row = {"rule": rule, "precision": precision, "size": args.size, "iterations": len(losses),
                       "first_loss": losses[0], "last_loss": losses[-1], "reduction": losses[0] / losses[-1]}
                summary.append(row)
                print(f"{rule:8s} {precision:5s} {losses[0]:.4g} -> {losses[-1]:.4g} ({row['reduction']:.1f}x)",
                      flush=True)
    text = (json.dumps(summary, indent=1) + "\n").encode()
    atomic_write(out / f"lbfgs-scale-{args.size}px.json", lambda stream: stream.write(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
