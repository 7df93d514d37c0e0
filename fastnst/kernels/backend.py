"""Which implementation of the kernels runs: ``auto``, ``torch`` or ``triton``.

``auto`` picks Triton for CUDA tensors and the pure-PyTorch twins elsewhere, quietly. An explicit
``triton`` that cannot run (no Triton, or no CUDA device without TRITON_INTERPRET=1) is an error
with a clear message.  The choice comes from ``set_backend``, else the FASTNST_BACKEND variable,
else ``auto``; a StyleConfig's ``backend`` overrides both for one run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch

from ..config import BACKENDS
from ..errors import ConfigError

ENV_VAR = "FASTNST_BACKEND"

_chosen: str | None = None  # set_backend's choice; None defers to the environment


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"{source} must be one of {', '.join(BACKENDS)}, not '{name}'")
    return name


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    if not triton_installed():
        return False
    from .triton_gram import interpreting as triton_interpreting

    return triton_interpreting()


def set_backend(name: str) -> None:
    """Choose the kernel backend for this process: auto, torch or triton."""
    global _chosen
    _check_name(name, "backend")
    if name == "triton" and not triton_installed():
        raise ConfigError("the triton backend needs the triton package (pip install triton)")
    _chosen = name


def get_backend() -> str:
    """The backend in force: set_backend's choice, else $FASTNST_BACKEND, else auto."""
    if _chosen is not None:
        return _chosen
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


def triton_runs_on(device: torch.device) -> bool:
    if not triton_installed():
        return False
    if interpreting():
        return device.type == "cpu"  # the interpreter works on host memory
    return device.type == "cuda"


def resolve(device: torch.device | str, backend: str | None = None) -> str:
    """The concrete backend ('torch' or 'triton') for tensors on ``device``."""
    device = torch.device(device)
    name = _check_name(backend, "--backend") if backend is not None else get_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_runs_on(device) else "torch"
    if not triton_runs_on(device):
        if not triton_installed():
            raise ConfigError("the triton backend needs the triton package; use --backend torch")
        raise ConfigError(f"the triton backend cannot run on {device}: it needs a CUDA device "
                          f"(or TRITON_INTERPRET=1 to run kernels on the CPU, slowly); "
                          f"use --backend auto or torch")
    return "triton"


OPS = ("gram", "style_losses", "style_loss", "grouped_style_losses", "meancov_losses", "content_losses",
       "content_loss")


def ops(device: torch.device | str, backend: str | None = None) -> SimpleNamespace:
    """The kernels of the backend resolved for ``device``: gram, and style/content losses per sample
    (``style_losses``, ``content_losses``: (B,)), summed over the batch (``style_loss``, ...) and
    for several style layers at once (``grouped_style_losses``: (L, B), one launch on Triton);
    ``meancov_losses`` (B,), the mean-covariance loss on the backend's Gram (meancov.py)."""
    name = resolve(device, backend)
    if name == "torch":
        from . import meancov, reference

        chosen = SimpleNamespace(**{op: getattr(reference, op) for op in OPS if op != "meancov_losses"},
                                 meancov_losses=meancov.meancov_losses)
    else:
        from . import meancov, triton_content_loss, triton_gram, triton_style_loss

        chosen = SimpleNamespace(gram=triton_gram.gram, style_losses=triton_style_loss.style_losses,
                                 meancov_losses=functools.partial(meancov.meancov_losses, gram=triton_gram.gram),
                                 style_loss=triton_style_loss.style_loss,
                                 grouped_style_losses=triton_style_loss.grouped_style_losses,
                                 content_losses=triton_content_loss.content_losses,
                                 content_loss=triton_content_loss.content_loss)
    return SimpleNamespace(name=name, **{op: getattr(chosen, op) for op in OPS})


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Runs inside give the same bits every time: PyTorch's deterministic algorithms (which also
    turn the Triton Gram's split, and its float atomics, off) and no cuDNN autotuning.  An op
    without a deterministic implementation warns instead of failing (warn_only)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]
