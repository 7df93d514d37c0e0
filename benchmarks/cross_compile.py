"""Compile every Triton kernel a fastnst run launches for a GPU that is not here, and check its resources.

Triton compiles ahead of time for any target: with the active driver replaced by one that only
names the target (sm_90, 32-thread warps) and every launch turned into ``warmup`` (compile, do not
run), fastnst's own launchers run as they would on an H100/H200: on meta tensors of the real
shapes (a meta tensor's data_ptr is its offset, so alignment specialization sees what a real
allocation would give), with the split the launcher picks for 132 SMs, under deterministic
algorithms where a path asks for them.  Each compiled kernel is then read back with the wheel's
``cuobjdump -res-usage`` (registers, stack frame: ptxas puts spilled registers there) and its
metadata (dynamic shared memory, warps).  A kernel fails the check when:

- it does not compile;
- it needs more shared memory than one sm_90 block may have (232,448 B);
- registers x threads exceed the 65,536 registers of an SM (the block could never launch);
- it spills (a stack frame) on a path a 16-bit run takes (bf16, the CLI's default on a GPU, and
  ``--precision fp16``); fp32 spills are reported, not refused.

The paths: ``grouped`` (all style layers in one launch each way: the default), ``per-layer``
(one style-loss launch per layer: the fallback, masks), ``gram`` (the Gram and its backward: style
targets, the tiled surrogate, mean-covariance), ``content`` (conv4_2), each forward and backward,
split and deterministic.  ``--matrix ci`` is the test suite's share (two sizes, one per
divisibility class of the deepest layer); ``--matrix full`` adds sizes and a batch of 4.

    python benchmarks/cross_compile.py [--matrix ci|full] [--arch 90] [--sms 132] [--json F] [--markdown F]

TRITON_INTERPRET is dropped before Triton is imported: the interpreter replaces the compiler.
Exit 0 when every kernel passes, 1 otherwise (each failure on one line).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":  # before Triton is imported (it decides at import time); not when a test imports this
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastnst.kernels import backend, triton_content_loss, triton_gram, triton_style_loss  # noqa: E402
from fastnst.vgg import layer_channels, layer_stride  # noqa: E402

STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
CONTENT_LAYER = "conv4_2"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "contiguous")
PATHS = ("grouped", "per-layer", "gram", "content")
# 512 px: every layer's positions divisible by 16; 1080x1920: conv5_1's 67x120 = 8040 is not.
# The deterministic path differs from the split one only in the SPLIT constexpr: one size of it in CI.
MATRICES = {
    "ci": {"sizes": ((512, 512), (1080, 1920)), "deterministic_sizes": ((512, 512),), "batches": (1,)},
    "full": {"sizes": ((256, 256), (512, 512), (1000, 1000), (1024, 1024), (1080, 1920), (2048, 2048)),
             "deterministic_sizes": ((512, 512), (1080, 1920), (2048, 2048)), "batches": (1, 4)},
}
SIXTEEN_BIT = ("bf16", "fp16")  # the dtypes of the CLI's GPU default (bf16) and --precision fp16

# sm_90 (H100, H200): CUDA's limits per block and per SM.
MAX_SHARED_BYTES = 232_448  # per block
MAX_REGISTERS_PER_SM = 65_536  # also the most one block may use
SHARED_BYTES_PER_SM = 233_472
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32


@dataclass(frozen=True)
class Case:
    """One launch site of a run: the path, the features' image size, dtype, layout and batch."""

    path: str
    height: int
    width: int
    dtype: str
    layout: str
    batch: int
    deterministic: bool

    @property
    def label(self) -> str:
        mode = "deterministic" if self.deterministic else "split"
        return (f"{self.path} {self.width}x{self.height} {self.dtype} {self.layout} batch {self.batch} {mode}")


@dataclass
class Compiled:
    """One compiled kernel (one specialization) and what it needs from the SM."""

    kernel: str
    registers: int
    stack_bytes: int  # the stack frame: spilled registers in these kernels (they have no local arrays)
    shared_bytes: int
    warps: int
    cases: list[str] = field(default_factory=list)
    dtypes: set[str] = field(default_factory=set)

    @property
    def threads(self) -> int:
        return self.warps * 32

    def problems(self) -> list[str]:
        found = []
        if self.shared_bytes > MAX_SHARED_BYTES:
            found.append(f"{self.shared_bytes} B of shared memory, more than sm_90's {MAX_SHARED_BYTES}")
        if self.registers * self.threads > MAX_REGISTERS_PER_SM:
            found.append(f"{self.registers} registers x {self.threads} threads, more than {MAX_REGISTERS_PER_SM}")
        if self.stack_bytes and self.dtypes & set(SIXTEEN_BIT):
            found.append(f"spills ({self.stack_bytes} B stack frame) on a 16-bit path")
        return found


class TargetOnlyDriver:
    """Stands in for the CUDA driver where there is none: it names the target and nothing else."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


def cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one function in ``cubin``, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([cuobjdump(), "-res-usage", file.name], capture_output=True, text=True,
                                check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if not match:
        raise RuntimeError(f"cuobjdump reported no register use: {report.strip()[:200]}")
    return int(match.group(1)), int(match.group(2))


class Recorder:
    """Every kernel compiled while active, by Triton's hash of the compiled binary."""

    def __init__(self):
        self.compiled: dict[str, Compiled] = {}
        self.case: Case | None = None

    def add(self, name: str, kernel) -> None:
        key = kernel.hash if hasattr(kernel, "hash") else kernel.metadata.hash
        entry = self.compiled.get(key)
        if entry is None:
            registers, stack = resource_usage(kernel.asm["cubin"])
            entry = self.compiled[key] = Compiled(name, registers, stack, kernel.metadata.shared,
                                                  kernel.metadata.num_warps)
        if self.case.label not in entry.cases:
            entry.cases.append(self.case.label)
        entry.dtypes.add(self.case.dtype)


@contextlib.contextmanager
def compiling_for(arch: int, sms: int, recorder: Recorder):
    """Launches compile for ``arch`` and return without running; the launchers split work as on a
    GPU of ``sms`` multiprocessors."""
    original_run, original_programs = JITFunction.run, triton_gram.programs_wanted
    original_driver = driver._active  # None unless a driver was already chosen

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        recorder.add(self.fn.__name__, kernel)
        return kernel

    driver.set_active(TargetOnlyDriver(arch))
    JITFunction.run = compile_only
    triton_gram.programs_wanted = lambda device: triton_gram.PROGRAMS_PER_SM * sms
    try:
        yield
    finally:
        JITFunction.run, triton_gram.programs_wanted = original_run, original_programs
        driver._active = original_driver


def features(case: Case, layer: str) -> torch.Tensor:
    stride = layer_stride(layer)
    x = torch.empty(case.batch, layer_channels(layer), case.height // stride, case.width // stride,
                    dtype=DTYPES[case.dtype], device="meta")
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


def target_gram(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[1], x.shape[1], device="meta")


def launch(case: Case) -> None:
    """The launches a run makes on ``case``'s path, forward and backward, through fastnst's own
    functions (the autograd Functions a step calls)."""
    if case.path == "content":
        x = features(case, CONTENT_LAYER)
        torch.autograd.grad(triton_content_loss.content_loss(x, x.detach()), x)
        return
    xs = [features(case, layer) for layer in STYLE_LAYERS]
    if case.path == "grouped":
        losses = triton_style_loss.GroupedStyleLosses.apply(len(xs), False, *xs, *map(target_gram, xs))
        torch.autograd.grad(losses.sum(), xs)
        return
    for x in xs:
        out = (triton_style_loss.style_loss(x, target_gram(x)) if case.path == "per-layer"
               else triton_gram.gram(x).sum())
        torch.autograd.grad(out, x)


def cases(matrix: str, sizes: list[tuple[int, int]] | None = None) -> list[Case]:
    """The matrix (``sizes`` replacing its sizes), bf16 channels_last (the default's) first."""
    spec = MATRICES[matrix]
    found = []
    for dtype, layout, batch, path in itertools.product(DTYPES, LAYOUTS, spec["batches"], PATHS):
        for deterministic, at in ((False, sizes or spec["sizes"]), (True, sizes or spec["deterministic_sizes"])):
            found += [Case(path, height, width, dtype, layout, batch, deterministic) for height, width in at]
    return found


def compile_matrix(selected: list[Case], arch: int, sms: int) -> tuple[Recorder, list[str]]:
    """Compile every case; returns the recorder and one line per case that failed to compile."""
    recorder, errors = Recorder(), []
    with compiling_for(arch, sms, recorder):
        for case in selected:
            recorder.case = case
            with backend.deterministic() if case.deterministic else contextlib.nullcontext():
                try:
                    launch(case)
                except Exception as exc:  # a compile error: every case is still tried
                    errors.append(f"{case.label}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
    return recorder, errors


def blocks_per_sm(c: Compiled) -> int:
    """How many blocks of ``c`` one sm_90 SM holds at once, by registers, shared memory and threads."""
    by_registers = MAX_REGISTERS_PER_SM // max(1, c.registers * c.threads)
    by_shared = SHARED_BYTES_PER_SM // c.shared_bytes if c.shared_bytes else MAX_BLOCKS_PER_SM
    return min(by_registers, by_shared, MAX_THREADS_PER_SM // c.threads, MAX_BLOCKS_PER_SM)


def markdown_table(recorder: Recorder) -> str:
    """One row per kernel and dtype: its compiled variants' ranges."""
    groups: dict[tuple[str, str], list[Compiled]] = {}
    for c in recorder.compiled.values():
        groups.setdefault((c.kernel, ", ".join(sorted(c.dtypes))), []).append(c)

    def span(values) -> str:
        values = list(values)
        low, high = min(values), max(values)
        return f"{low}" if low == high else f"{low}-{high}"

    lines = ["| kernel | dtype | variants | warps | registers | shared (B) | spill stack (B) | blocks/SM |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (kernel, dtype), variants in sorted(groups.items()):
        lines.append(f"| `{kernel}` | {dtype} | {len(variants)} | {span(c.warps for c in variants)} "
                     f"| {span(c.registers for c in variants)} | {span(c.shared_bytes for c in variants)} "
                     f"| {span(c.stack_bytes for c in variants)} | {span(blocks_per_sm(c) for c in variants)} |")
    return "\n".join(lines) + "\n"


SECTION = "\n## Triton "


def markdown_page(recorder: Recorder, args: argparse.Namespace, cases_compiled: int, failures: list[str],
                  previous: str = "") -> str:
    """docs/compiled-kernels.md: how the tables are made and the limits, then one section per Triton
    version: this one's replaces its old section, the others' (from ``previous``) are kept, so the
    page holds CI's Triton and the GPU machine's side by side."""
    command = " ".join(["python benchmarks/cross_compile.py", f"--matrix {args.matrix}",
                        *(f"--dtype {d}" for d in args.dtype or ()), "--markdown docs/compiled-kernels.md"])
    intro = f"""# The Triton kernels, compiled for sm_{args.arch}

Every kernel specialization a run launches, cross-compiled on a CPU for sm_{args.arch} (H100/H200),
the launchers splitting work for {args.sms} SMs: `{command}`, once per Triton version (the
section of the version it runs with is replaced, the others kept).  `tests/test_cross_compile.py`
compiles the same matrix in CI and fails on a compile error, more than {MAX_SHARED_BYTES:,} B of
shared memory, registers x threads over {MAX_REGISTERS_PER_SM:,}, or a spill on a 16-bit path
(bf16, the GPU default, and `--precision fp16`).

Columns: *variants* are the specializations compiled (layer, layout, divisibility of sizes and
strides by 16, split or not, batch 1); *registers* per thread and *spill stack* (the stack frame
ptxas gives spilled registers; these kernels have no local arrays) from `cuobjdump -res-usage`;
*shared* is Triton's dynamic shared memory per block; *blocks/SM* is how many blocks one SM holds
by registers, shared memory and threads (at most {MAX_BLOCKS_PER_SM}).  fp32's ieee products run
on the CUDA cores, uncapped, and may spill a few bytes; that is reported, not refused.
"""
    this = (f"{triton.__version__} (torch {torch.__version__})\n\n{cases_compiled} launch sites of the "
            f"`{args.matrix}` matrix, {len(recorder.compiled)} distinct kernels, {len(failures)} failures.\n\n"
            f"{markdown_table(recorder)}")
    sections = {part.split(" ", 1)[0]: part for part in previous.split(SECTION)[1:]}
    sections[triton.__version__] = this
    return intro + "".join(SECTION + sections[version] for version in sorted(sections, reverse=True))


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    try:
        return int(height), int(width or height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be H or HxW, not '{text}'") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--matrix", choices=sorted(MATRICES), default="ci")
    parser.add_argument("--arch", type=int, default=90, help="compute capability times ten (90: H100/H200)")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors the launchers split work for")
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append",
                        help="only these dtypes (repeatable; default all)")
    parser.add_argument("--path", choices=PATHS, action="append", help="only these paths (repeatable; default all)")
    parser.add_argument("--layout", choices=LAYOUTS, action="append", help="only these layouts (repeatable)")
    parser.add_argument("--mode", choices=("split", "deterministic"), help="only the split or the deterministic path")
    parser.add_argument("--size", type=_size, action="append", metavar="HxW",
                        help="these image sizes instead of the matrix's (repeatable)")
    parser.add_argument("--json", type=Path, help="write every compiled kernel and failure here")
    parser.add_argument("--markdown", type=Path, help="write the compiled table here (Markdown)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    selected = [case for case in cases(args.matrix, args.size)
                if (not args.dtype or case.dtype in args.dtype) and (not args.path or case.path in args.path)
                and (not args.layout or case.layout in args.layout)
                and (not args.mode or case.deterministic == (args.mode == "deterministic"))]
    started = time.perf_counter()
    recorder, errors = compile_matrix(selected, args.arch, args.sms)
    failures = errors + [f"{c.kernel} ({', '.join(sorted(c.dtypes))}; {c.cases[0]}): {problem}"
                         for c in recorder.compiled.values() for problem in c.problems()]
    print(markdown_table(recorder), end="")
    for line in failures:
        print(f"FAIL {line}")
    print(f"{len(recorder.compiled)} kernels compiled for sm_{args.arch} from {len(selected)} cases in "
          f"{time.perf_counter() - started:.0f} s (Triton {triton.__version__}); {len(failures)} failures")
    if args.json:
        document = {"arch": args.arch, "sms": args.sms, "triton": triton.__version__, "torch": torch.__version__,
                    "matrix": args.matrix, "cases": len(selected), "failures": failures,
                    "kernels": [{**asdict(c), "dtypes": sorted(c.dtypes)} for c in recorder.compiled.values()]}
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    if args.markdown:
        previous = args.markdown.read_text() if args.markdown.exists() else ""
        args.markdown.write_text(markdown_page(recorder, args, len(selected), failures, previous))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
