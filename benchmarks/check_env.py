"""Stage 0 of the GPU check: what the machine is, and whether Triton compiles and runs at all.

Prints nvidia-smi, the versions (driver, CUDA, cuDNN, torch, Triton, Python), the device's
multiprocessors, memory and capability, then one Gram launch of a small random matrix checked
against float64, the quickest proof that the Triton path works on this machine.

    PYTHONPATH=. python3 benchmarks/check_env.py [--dry-run]
"""

from __future__ import annotations

import subprocess

import torch
from stage_util import device_for, figures, relative_error, run_stage, stage_parser


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi: {exc}"


def describe(device: torch.device) -> str:
    from fastnst.devices import run_metadata

    meta = run_metadata()
    commit = meta["commit"][:12] + ("-dirty" if meta["commit"].endswith("-dirty") else "")
    versions = (f"torch {meta['torch']}, triton {meta['triton']}, cuda {meta['cuda']}, cudnn {meta['cudnn']}, "
                f"python {meta['python']}, commit {commit}")
    if device.type != "cuda":
        return f"{meta['device']}; {versions}"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, "
            f"cc {props.major}.{props.minor}, driver {meta['driver']}, bf16 {torch.cuda.is_bf16_supported()}; "
            f"{versions}")


def triton_smoke(device: torch.device) -> str:
    """One Gram through the Triton kernel (compiled on CUDA, interpreted on the CPU) vs float64."""
    from fastnst.kernels import triton_gram

    x = torch.randn(1, 64, 4096, device=device)
    out, _ = triton_gram.launch_gram(x)
    f = x.double()
    error = relative_error(out, f @ f.transpose(1, 2))
    return f"triton gram {'ok' if error < 2e-5 else 'WRONG'} (rel err {error:.1e})"


def main() -> int:
    args = stage_parser(__doc__.splitlines()[0]).parse_args()
    device = device_for(args.dry_run)
    if device.type == "cuda":
        print(nvidia_smi(), flush=True)
    description = describe(device)
    print(description, flush=True)
    figures(description)
    smoke = triton_smoke(device)
    figures(f"{description}; {smoke}")
    return 0 if "ok" in smoke else 1


if __name__ == "__main__":
    run_stage(main)
