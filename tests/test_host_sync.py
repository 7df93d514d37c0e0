"""The step a CUDA run captures in a graph reads no tensor value on the host, proven on the CPU.

CUDA-graph capture fails (or bakes in a stale value) where the step synchronises with the host: an
``.item()``, ``bool(tensor)``, ``nonzero``, a boolean-mask index, a ``linalg`` op that checks its
``info`` on the host, a tensor made from Python data.  Under a TorchDispatchMode every aten op of
the step is seen, on any device; the ops that read a value on the host, or need the values to know
an output's shape, are refused here.  The step is the one ``build_run`` makes, the function
``GraphedStep`` captures on a GPU: fast (split Gram) and deterministic paths, L-BFGS and Adam, bf16
and fp16 with its loss scaler, on the Triton launchers (interpreted) and on the PyTorch twins.

What this cannot see on a CPU: ``.cpu()`` of a CPU tensor is the tensor itself, so a device-to-host
copy shows only on a GPU (benchmarks/check_graph.py captures the step there); and what a CUDA
kernel does beneath its aten op (the deterministic ``index_put_`` and ``scatter`` of optim.py are
sort-based kernels on CUDA, which run on the device; at the aten level they are the same ops).
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastnst import StyleConfig
from fastnst.kernels.backend import deterministic
from fastnst.run import build_run, resolve_runtime, synthetic_inputs

# Ops that hand a tensor's value to the host, or whose output shape depends on the values.
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_static",
              "aten::equal", "aten::allclose", "aten::masked_select", "aten::unique_dim", "aten::_unique",
              "aten::_unique2", "aten::unique_consecutive", "aten::repeat_interleave", "aten::tolist",
              "aten::lift_fresh", "aten::lift_fresh_copy", "aten::_assert_scalar",
              "aten::_linalg_check_errors"}
INDEXING = {"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


class HostReads(TorchDispatchMode):
    """Records every aten op; ``reads`` lists those that would synchronise a CUDA stream with the host."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.ops[name] += 1
        if name in HOST_READS:
            self.reads.append(name)
        elif name.startswith("aten::linalg_") and name.endswith("_ex") and kwargs.get("check_errors", False):
            self.reads.append(f"{name}(check_errors=True)")
        elif name in INDEXING and _has_mask_index(args):
            self.reads.append(f"{name} with a boolean mask")  # a mask index is a nonzero
        return func(*args, **kwargs)


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _steps_seen(backend: str, optimizer: str, precision: str, exact: bool) -> HostReads:
    config = StyleConfig(weights="random", size=32, optimizer=optimizer, precision=precision, backend=backend,
                         device="cpu", quiet=True)
    with deterministic() if exact else contextlib.nullcontext():
        runtime = resolve_runtime(config)
        run = build_run(runtime, config, synthetic_inputs(32, runtime.device))
        assert not run.graphed and (run.scaler is not None) == (precision == "fp16")
        with HostReads() as seen:  # from the fresh state GraphedStep captures in, and two steps on
            for _ in range(3):
                run.step(run.image)
    return seen


# Every optimiser and precision on the fast path; the deterministic path differs only inside the
# Triton launchers (no split), so two of its cases cover it.
STEPS = [("lbfgs", "bf16", False), ("lbfgs", "fp16", False), ("adam", "bf16", False), ("adam", "fp16", False),
         ("lbfgs", "bf16", True), ("adam", "fp16", True)]


@pytest.mark.parametrize("optimizer, precision, exact", STEPS,
                         ids=[f"{o}-{p}-{'deterministic' if e else 'fast'}" for o, p, e in STEPS])
def test_the_captured_step_reads_nothing_on_the_host(optimizer, precision, exact):
    seen = _steps_seen("triton", optimizer, precision, exact)
    assert seen.ops["aten::convolution"] and seen.ops["aten::convolution_backward"]  # the whole step was seen
    if optimizer == "lbfgs":
        assert seen.ops["aten::linalg_solve_triangular"] and seen.ops["aten::index_put_"]
    assert seen.reads == [], f"host reads in the step: {collections.Counter(seen.reads)}"


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_the_step_on_the_pytorch_kernels_reads_nothing_on_the_host(optimizer):
    seen = _steps_seen("torch", optimizer, "fp32", exact=False)
    assert seen.ops["aten::convolution"] and seen.reads == [], collections.Counter(seen.reads)


def test_the_detector_sees_each_kind_of_host_read():
    """A check that cannot fail is no check: each of these would break a capture, and is seen."""
    x = torch.rand(8)
    cases = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "nonzero": lambda: torch.nonzero(x > 0.5),
        "mask index": lambda: x[x > 0.5],
        "python data": lambda: torch.tensor([1.0, 2.0]) * x[:2],
        "cholesky info": lambda: torch.linalg.cholesky(torch.eye(2)),
    }
    for what, action in cases.items():
        with HostReads() as seen:
            action()
        assert seen.reads, what
    with HostReads() as seen:
        torch.where(x > 0.5, x, 0.0).sum()
    assert seen.reads == []
