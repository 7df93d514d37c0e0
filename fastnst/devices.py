"""Device choice (``--device auto|cpu|cuda|cuda:N``) and what ``fastnst info`` reports about it."""

from __future__ import annotations

import functools

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


def run_metadata() -> dict:
    """Where and with what a measurement was taken: device, versions, date, commit.  The machine's
    part is asked once per process (nvidia-smi and git are processes of their own, and a benchmark
    rewrites its JSON, with this, after every row); the date is the call's."""
    import datetime

    return {**_machine_metadata(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


@functools.lru_cache(maxsize=1)
def _machine_metadata() -> dict:
    import os
    import platform

    from .version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed or broken
        triton_version = None
    commit = os.environ.get("FASTNST_COMMIT") or _git_commit(os.path.dirname(os.path.abspath(__file__)))
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({_cpu_name()}, {os.cpu_count()} cores)",
        "driver": _nvidia_driver() if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "fastnst": __version__,
        "commit": commit or "unknown",
    }


def _git_commit(folder: str) -> str | None:
    """HEAD of the source tree, with '-dirty' when it has uncommitted changes; None outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=folder).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=folder).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()
