"""Device choice (``--device auto|cpu|cuda|cuda:N``) and what ``fastnst info`` reports about it."""

from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(spec: str) -> torch.device:
    """The torch device for a --device value; DeviceError if it is not on this machine."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"--device {spec}: no CUDA device is available (torch {torch.__version__}, "
                          f"{built}); use --device cpu")
    device = torch.device(spec)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {spec}: this machine has {count} CUDA device(s), "
                          f"numbered 0 to {count - 1}")
    return device


def describe_devices() -> list[str]:
    """One line per device: the CPU, then each CUDA device with its memory and capability."""
    import os

    lines = [f"cpu: {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {props.major}.{props.minor}")
    else:
        lines.append("cuda: not available")
    return lines
