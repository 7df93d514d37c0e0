"""Stage 2 of the GPU check: CUDA-graph replay of the whole step against the same step run eagerly.

At 512 and 1024 px, bf16 (the fast path) then fp32, random weights and images, L-BFGS:

- one step: the loss at the shared start image and the image change (the first L-BFGS step is
  -g / max(1, |g|_1), so it compares the gradients), default kernels (the Gram split over programs
  with atomics): relative difference of the steps within 1e-4 (fp32) or 1e-2 (bf16), as argued in
  tests/test_gpu.py;
- a 20-step trajectory with deterministic algorithms (unsplit Grams, deterministic cuDNN): losses
  within 1e-4 relative, pixels within 1e-4; and, in bf16 only, the same 20 steps with the default
  kernels, reported (L-BFGS amplifies the last-bit differences of atomics; no pass mark).

Every replay runs under ``torch.cuda.set_sync_debug_mode("error")``: a host synchronisation
inside the captured step would raise.  On the CPU (--dry-run) there are no CUDA graphs: the same
comparisons run eager against eager, which checks the script only.

    PYTHONPATH=. python3 benchmarks/check_graph.py [--json PATH] [--dry-run]
"""

from __future__ import annotations

import contextlib

import torch
from stage_util import Results, device_for, figures, first_line, run_stage, stage_parser

STEP_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
TRAJECTORY_TOLERANCE = 1e-4
STEPS = 20


@contextlib.contextmanager
def no_sync_allowed(device: torch.device):
    """Any host synchronisation inside raises (CUDA only)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def prepared(size: int, precision: str, graphed: bool, device: torch.device):
    from fastnst.config import StyleConfig
    from fastnst.run import Inputs, build_run, resolve_runtime

    config = StyleConfig(size=size, optimizer="lbfgs", weights="random", precision=precision, cuda_graph=graphed,
                         quiet=True)
    g = torch.Generator().manual_seed(3)
    content, style = (torch.rand(1, 3, size, size, generator=g).to(device) for _ in range(2))
    return build_run(resolve_runtime(config, device), config, Inputs(content=content, styles=[style]))


def run_steps(size, precision, graphed, steps, device):
    """(losses (steps,), start image, final image) of ``steps`` steps, on the CPU in float64."""
    run = prepared(size, precision, graphed, device)
    start = run.image.detach().clone()
    # Replays only: an eager step's first call compiles kernels and may synchronise.
    with no_sync_allowed(device) if graphed else contextlib.nullcontext():
        losses = [run.step(run.image).clone() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.stack(losses).double().cpu(), start.double().cpu(), run.image.detach().double().cpu()


def one_step(size, precision, device) -> dict:
    (eager_loss, start, eager_image), (graph_loss, _, graph_image) = (
        run_steps(size, precision, graphed, 1, device) for graphed in (False, True))
    eager_step, graph_step = eager_image - start, graph_image - start
    step_difference = ((graph_step - eager_step).norm() / eager_step.norm()).item()
    loss_difference = abs(graph_loss[0] - eager_loss[0]).item() / abs(eager_loss[0]).item()
    ok = step_difference <= STEP_TOLERANCE[precision] and loss_difference <= 1e-5 and eager_step.abs().max() > 0
    return dict(check="one step", size=size, precision=precision, step_difference=step_difference,
                loss_difference=loss_difference, ok=bool(ok))


def trajectory(size, precision, device, exact: bool) -> dict:
    from fastnst.kernels.backend import deterministic

    with deterministic() if exact else contextlib.nullcontext():
        (eager_losses, _, eager_image), (graph_losses, _, graph_image) = (
            run_steps(size, precision, graphed, STEPS, device) for graphed in (False, True))
    loss_difference = ((graph_losses - eager_losses).abs() / eager_losses.abs()).max().item()
    pixel_difference = (graph_image - eager_image).abs().max().item()
    decreased = bool(eager_losses[-1] < eager_losses[0])
    row = dict(check=f"{STEPS} steps, {'deterministic' if exact else 'default'} kernels", size=size,
               precision=precision, loss_difference=loss_difference, pixel_difference=pixel_difference,
               first_loss=eager_losses[0].item(), last_loss=eager_losses[-1].item(), loss_decreased=decreased)
    if exact:
        row["ok"] = (loss_difference <= TRAJECTORY_TOLERANCE and pixel_difference <= TRAJECTORY_TOLERANCE
                     and decreased)
    return row


def summary(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        verdict = "" if "ok" not in r else (" ok" if r["ok"] else " FAIL")
        if "error" in r:
            parts.append(f"{r['size']} {r['precision']} {r['check']}: {r['error']}")
        elif r["check"] == "one step":
            parts.append(f"{r['size']} {r['precision']} 1 step{verdict} (step {r['step_difference']:.1e}, "
                         f"loss {r['loss_difference']:.1e})")
        else:
            parts.append(f"{r['size']} {r['precision']} {r['check']}{verdict} (loss {r['loss_difference']:.1e}, "
                         f"px {r['pixel_difference']:.1e})")
    return "; ".join(parts)


def main() -> int:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args()
    device = device_for(args.dry_run)
    sizes, precisions = (args.sizes, ("bf16", "fp32")) if not args.dry_run else ([32], ("fp32",))
    results = Results(args.json, "fastnst gpu check: graph replay", graphed=device.type == "cuda",
                      note=None if device.type == "cuda" else "dry run on the CPU: eager against eager")
    for precision in precisions:
        for size in sizes:
            checks = [(one_step, {}), (trajectory, {"exact": True})]
            if precision == precisions[0]:  # informative only: once, for the fast path's precision
                checks.append((trajectory, {"exact": False}))
            for check, options in checks:
                try:
                    row = check(size, precision, device, **options)
                except Exception as exc:  # a failed capture or a sync inside the replay is a result
                    row = dict(check=check.__name__, size=size, precision=precision, ok=False,
                               error=first_line(exc))
                results.add(row)
                print(row, flush=True)
                figures(summary(results.rows))
    return 0 if all(r.get("ok", True) for r in results.rows) else 1


if __name__ == "__main__":
    run_stage(main)
