"""Video benchmark: frames/s of ``fastnst video``, sequential and multipass, on a clip whose motion
is known (a photo translated 3 px right and 2 px down per frame), so the flow is given exactly and
the run needs neither OpenCV nor PyAV nor RAFT weights (the GPU image has none of them).  Reports
frames/s (the whole render: targets, steps, writing frames) and the consistency error.

    PYTHONPATH=. python3 benchmarks/bench_video.py [--sizes 512 1024] [--frames 8] [--iterations 50]
        [--json PATH] [--dry-run]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from stage_util import Results, device_for, figures, run_stage, stage_parser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHIFT = (3.0, 2.0)  # (dx, dy) px per frame


def _clip(folder: Path, size: int, frames: int) -> None:
    """``frames`` crops of Tübingen, each SHIFT further: frame k+1 (p) = frame k (p - SHIFT)."""
    from fastnst.images import image_to_tensor, load_image, resized, save_image

    margin = int(max(SHIFT)) * frames
    photo = image_to_tensor(resized(load_image(EXAMPLES / "tubingen.jpg"), size + 2 * margin))
    height, width = photo.shape[-2] - 2 * margin, size
    dx, dy = (int(v) for v in SHIFT)
    for k in range(frames):
        y0, x0 = margin - dy * k, margin - dx * k
        save_image(photo[..., y0:y0 + height, x0:x0 + width], folder / f"f{k:04d}.png")


def _known_flow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The flow of the translation from whichever frame is first to the other (a before b when
    ``a`` is the older frame: +SHIFT; else -SHIFT), found by comparing the two frames' shifts."""
    height, width = a.shape[-2:]
    forward = torch.tensor(SHIFT).expand(height, width, 2)
    ahead = (b[..., int(SHIFT[1]):, int(SHIFT[0]):] - a[..., :-int(SHIFT[1]), :-int(SHIFT[0])]).abs().mean()
    behind = (a[..., int(SHIFT[1]):, int(SHIFT[0]):] - b[..., :-int(SHIFT[1]), :-int(SHIFT[0])]).abs().mean()
    return (forward if ahead < behind else -forward).contiguous()


def main() -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    device = device_for(args.dry_run)
    sizes, frames, iterations = ([48], 3, 2) if args.dry_run else (args.sizes, args.frames, args.iterations)
    from fastnst import StyleConfig
    from fastnst.config import VideoConfig
    from fastnst.video import render_video

    results = Results(args.json, "video", frames=frames, iterations=iterations)
    for size in sizes:
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / "clip").mkdir()
            _clip(folder / "clip", size, frames)
            config = StyleConfig(weights="random", size=size, iterations=iterations, device=str(device), quiet=True)
            for mode in ("sequential", "multipass"):
                settings = VideoConfig(mode=mode, window=frames)
                summary = render_video(folder / "clip", [str(EXAMPLES / "starry_night.jpg")], folder / mode, config,
                                       settings, progress=False, flow_function=_known_flow)
                row = {"size": size, "mode": mode, "frames": summary.frames, "seconds": round(summary.seconds, 3),
                       "frames_per_second": round(summary.frames / summary.seconds, 4),
                       "consistency": summary.mean_consistency}
                results.add(row)
                figures(", ".join(f"{r['mode']} {r['size']} px {r['frames_per_second']:.2f} frames/s"
                                  for r in results.rows))
    return 0


if __name__ == "__main__":
    run_stage(main)
