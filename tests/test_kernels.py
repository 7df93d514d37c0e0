"""Triton kernels against float64 references.

Without CUDA these run through Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1);
with CUDA they run compiled on the GPU.  Every case draws fresh random inputs, and kernel outputs
are allocated NaN-filled, so an element a kernel forgets to write fails the comparison.

Tolerances, as max |error| / max |reference|:
- Gram and both loss values: 2e-5 for every input dtype.  Products of bf16/fp16 inputs are exact
  in fp32 and accumulation is fp32, so only fp32 summation order differs from float64.
- Gradients are written in the input's dtype: fp32 2e-5; fp16 2e-3 (rounding 2^-11); bf16 2e-2
  (rounding 2^-8, and D is rounded to bf16 before the tensor-core product on a GPU).
Under the interpreter bf16/fp16 products are formed in fp32 (its bf16 dot is wrong: numpy has no
bf16 matmul), so the tensor-core path is only exercised by the same tests on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastnst import kernels
from fastnst.errors import ConfigError
from fastnst.kernels import backend, reference

pytest.importorskip("triton")

from fastnst.kernels import triton_content_loss, triton_gram, triton_style_loss  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
VALUE_TOLERANCE = 2e-5


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN instead of whatever memory held."""
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def nan_like(x):
        return torch.empty_like(x).fill_(float("nan"))

    monkeypatch.setattr(triton_gram, "new_output", nan_output)
    monkeypatch.setattr(triton_gram, "new_like", nan_like)


def _features(batch, channels, positions, dtype, layout, seed):
    """Random features with ``positions`` = H*W in the given layout ('contiguous', 'channels_last'
    or '3d'); values drawn in float64 then rounded, so the reference sees exactly the inputs."""
    g = torch.Generator().manual_seed(seed)
    height, width = (7, positions // 7) if positions % 7 == 0 else (1, positions)
    x = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "3d":
        x = x.flatten(2)
    return x.to(DEVICE)


def _close(actual, expected, tolerance, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert not torch.isnan(actual).any(), f"{what}: unwritten (NaN) elements"
    scale = expected.abs().max().item() or 1.0
    error = (actual - expected).abs().max().item() / scale
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


def _gram64(x):
    f = x.double().cpu().flatten(2) if x.dim() == 4 else x.double().cpu()
    return f @ f.transpose(1, 2)


SHAPES = [(1, 3, 97), (3, 64, 1009), (1, 96, 97), (3, 3, 1009), (1, 64, 91), (3, 96, 91)]


@pytest.mark.parametrize("batch, channels, positions", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "3d"])
@pytest.mark.parametrize("split", [1, None], ids=["one-program-per-tile", "split-M"])
def test_gram(batch, channels, positions, dtype, layout, split):
    x = _features(batch, channels, positions, dtype, layout, seed=hash((batch, channels, positions)) % 1000)
    out, loss = triton_gram.launch_gram(x, split=split)
    assert out.shape == (batch, channels, channels) and out.dtype == torch.float32 and loss is None
    _close(out, _gram64(x), VALUE_TOLERANCE, "gram")
    assert torch.equal(out, out.transpose(1, 2))  # the mirror is written from the same tile


@pytest.mark.parametrize("batch, channels, positions", [(1, 3, 97), (3, 64, 1009), (3, 96, 91), (1, 130, 97)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shared_target", [True, False], ids=["A(C,C)", "A(B,C,C)"])
def test_style_loss_value_and_gradient(batch, channels, positions, dtype, layout, shared_target):
    x = _features(batch, channels, positions, dtype, layout, seed=channels * positions)
    g = torch.Generator().manual_seed(positions)
    basis = torch.randn(batch, channels, 2 * channels, generator=g, dtype=torch.float64)
    target = basis @ basis.transpose(1, 2) * (positions / (2 * channels))  # Grams of similar scale
    if shared_target:
        target = target[0]
    # A weight that makes gradients O(1): small gradients would sit in fp16's subnormals.
    weight = float(channels * positions)
    x64 = x.double().cpu().requires_grad_(True)
    expected = reference.style_loss(x64, target, weight)
    (expected_grad,) = torch.autograd.grad(expected * 0.75, x64)

    xt = x.clone().requires_grad_(True)
    loss = triton_style_loss.style_loss(xt, target.float().to(DEVICE), weight)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    _close(loss, expected, VALUE_TOLERANCE, "style loss")
    (grad,) = torch.autograd.grad(loss * 0.75, xt)  # grad_out = 0.75 reaches the kernel
    assert grad.dtype == dtype and grad.stride() == x.stride()
    _close(grad, expected_grad, GRAD_TOLERANCE[dtype], "style loss gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [None, 1], ids=["split-by-device", "no-split"])
def test_grouped_style_losses_equal_each_layers_own(dtype, split, monkeypatch):
    """Four layers of different C, M and layout, one shared target and one per sample, in one
    forward and one backward launch: every layer's per-sample losses and gradients (with a
    per-layer, per-sample grad_out) match float64 as the single-layer kernels do.  Layer 0 (C = 3,
    M = 1009) takes the split path and layer 3 (C = 130, three tiles per side) the unsplit one
    under the device's split; ``split=1`` forces no split anywhere."""
    if split is not None:
        real = triton_gram._GramLayer.__init__
        monkeypatch.setattr(triton_gram._GramLayer, "__init__",
                            lambda self, x, target, scale, split_=None: real(self, x, target, scale, split))
    shapes = [(3, 1009, "contiguous"), (64, 91, "channels_last"), (96, 97, "contiguous"), (130, 14, "channels_last")]
    g = torch.Generator().manual_seed(31)
    xs, targets = [], []
    for i, (channels, positions, layout) in enumerate(shapes):
        xs.append(_features(2, channels, positions, dtype, layout, seed=40 + i))
        basis = torch.randn(2, channels, 2 * channels, generator=g, dtype=torch.float64)
        target = basis @ basis.transpose(1, 2) * (positions / (2 * channels))
        targets.append(target[0] if i % 2 else target)  # shared (C, C) and per-sample (B, C, C)
    grad_out = torch.randn(len(shapes), 2, generator=g, dtype=torch.float64) * 1e3 + 2e3
    x64 = [x.double().cpu().requires_grad_(True) for x in xs]
    expected = reference.grouped_style_losses(x64, targets)
    expected_grads = torch.autograd.grad(expected, x64, grad_outputs=grad_out)
    launches = []
    for name in ("_grouped_gram_kernel", "_grouped_gram_backward_kernel", "_gram_kernel", "_gram_backward_kernel"):
        kernel = getattr(triton_gram, name)
        monkeypatch.setattr(triton_gram, name, _Counted(kernel, name, launches))
    xt = [x.clone().requires_grad_(True) for x in xs]
    losses = triton_style_loss.grouped_style_losses(xt, [target.float().to(DEVICE) for target in targets])
    assert losses.shape == (4, 2) and losses.dtype == torch.float32
    grads = torch.autograd.grad(losses, xt, grad_outputs=grad_out.float().to(DEVICE))
    assert launches == ["_grouped_gram_kernel", "_grouped_gram_backward_kernel"]
    for layer in range(4):
        _close(losses[layer], expected[layer], VALUE_TOLERANCE, f"layer {layer} losses")
        assert grads[layer].dtype == dtype and grads[layer].stride() == xs[layer].stride()
        _close(grads[layer], expected_grads[layer], GRAD_TOLERANCE[dtype], f"layer {layer} gradient")


class _Uncompilable:
    """A Triton kernel that fails where it would compile, as a kernel an older Triton rejects."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("tuples are not supported\nsecond line")

        return launch


@pytest.mark.parametrize("broken", ["_grouped_gram_kernel", "_grouped_gram_backward_kernel"],
                         ids=["forward", "backward"])
def test_grouped_style_losses_fall_back_to_one_launch_per_layer(monkeypatch, capsys, broken):
    """Where either grouped kernel cannot compile (an older Triton without tuple arguments), its
    first use says so once and that call and every later one give the same losses and gradients
    through the one-layer kernels.  The backward runs inside autograd, after the forward has
    already succeeded: it falls back there too, instead of failing the run's first step."""
    monkeypatch.setattr(triton_style_loss, "_grouped_works", {"forward": None, "backward": None})
    monkeypatch.setattr(triton_gram, broken, _Uncompilable())
    g = torch.Generator().manual_seed(5)
    xs = [_features(2, c, 91, torch.float32, "channels_last", seed=c) for c in (3, 64)]
    targets = [torch.rand(c, c, generator=g).to(DEVICE) for c in (3, 64)]
    # Deterministic kernels (no split, no float atomics) so the grouped and one-layer results can be
    # compared bit for bit on a GPU too.
    with backend.deterministic():
        for attempt in range(2):
            leaves = [x.clone().requires_grad_(True) for x in xs]
            losses = triton_style_loss.grouped_style_losses(leaves, targets)
            grads = torch.autograd.grad((losses * torch.tensor([[1.0], [0.5]], device=DEVICE)).sum(), leaves)
            for layer, (x, target) in enumerate(zip(xs, targets)):
                leaf = x.clone().requires_grad_(True)
                alone = triton_style_loss.style_losses(leaf, target)
                (grad,) = torch.autograd.grad(alone.sum() * (1.0, 0.5)[layer], leaf)
                assert torch.equal(losses[layer], alone) and torch.equal(grads[layer], grad)
    direction = "forward" if broken == "_grouped_gram_kernel" else "backward"
    err = capsys.readouterr().err
    assert err.count(f"grouped style-loss kernels unavailable ({direction}: tuples are not supported)") == 1
    assert err.count("\n") == 1


def test_the_grouped_kernels_without_fallback_raise(monkeypatch):
    """GroupedStyleLosses.apply(fallback=False), as the GPU check calls it, never hides a failure."""
    monkeypatch.setattr(triton_style_loss, "_grouped_works", {"forward": None, "backward": None})
    monkeypatch.setattr(triton_gram, "_grouped_gram_backward_kernel", _Uncompilable())
    leaves = [_features(1, 64, 16, torch.float32, "contiguous", seed=1).requires_grad_(True)]
    losses = triton_style_loss.GroupedStyleLosses.apply(1, False, *leaves, torch.ones(64, 64, device=DEVICE))
    with pytest.raises(RuntimeError, match="tuples are not supported"):
        torch.autograd.grad(losses.sum(), leaves)


class _Counted:
    """A Triton kernel whose launches (``kernel[grid](...)``) are recorded by name."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 3, 7, 11), (3, 64, 1, 1009), (2, 96, 13, 7)])
def test_content_loss_value_and_gradient(dtype, layout, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x, target = (t.contiguous(memory_format=torch.channels_last) for t in (x, target))
    x, target = x.to(DEVICE), target.to(DEVICE)
    x64 = x.double().cpu().requires_grad_(True)
    expected = reference.content_loss(x64, target.double().cpu())
    (expected_grad,) = torch.autograd.grad(expected * 2.5, x64)
    xt = x.clone().requires_grad_(True)
    loss = triton_content_loss.content_loss(xt, target)
    _close(loss, expected, VALUE_TOLERANCE, "content loss")
    (grad,) = torch.autograd.grad(loss * 2.5, xt)
    assert grad.dtype == dtype and grad.stride() == x.stride()
    _close(grad, expected_grad, GRAD_TOLERANCE[dtype], "content loss gradient")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_sample_losses_and_gradients(layout):
    """style_losses / content_losses give each sample its own loss, and a per-sample grad_out
    reaches each sample's gradient (the batch manifest's losses and the batched step need both)."""
    x = _features(3, 70, 91, torch.float32, layout, seed=21)
    g = torch.Generator().manual_seed(22)
    basis = torch.randn(70, 140, generator=g, dtype=torch.float64)
    target = basis @ basis.T * (91 / 140)
    content_target = torch.randn(x.shape, generator=g, dtype=torch.float64).float().to(DEVICE)
    grad_out = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    for name, ours, theirs, args in [
            ("style", triton_style_loss.style_losses, reference.style_losses, (target, 7.0)),
            ("content", triton_content_loss.content_losses, reference.content_losses, (content_target,))]:
        x64 = x.double().cpu().requires_grad_(True)
        expected = theirs(x64, *(a.double().cpu() if torch.is_tensor(a) else a for a in args))
        (expected_grad,) = torch.autograd.grad(expected, x64, grad_outputs=grad_out)
        xt = x.clone().requires_grad_(True)
        losses = ours(xt, *(a.float().to(DEVICE) if torch.is_tensor(a) else a for a in args))
        assert losses.shape == (3,) and losses.dtype == torch.float32
        for b in range(3):
            _close(losses[b], expected[b], VALUE_TOLERANCE, f"{name} loss of sample {b}")
        (grad,) = torch.autograd.grad(losses, xt, grad_outputs=grad_out.float().to(DEVICE))
        _close(grad, expected_grad, GRAD_TOLERANCE[torch.float32], f"{name} gradient with per-sample grad_out")


def test_content_loss_with_different_layouts():
    x = torch.randn(2, 5, 6, 7, device=DEVICE)
    target = torch.randn(2, 5, 6, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    _close(triton_content_loss.content_loss(x, target), reference.content_loss(x.double(), target.double()),
           VALUE_TOLERANCE, "mixed-layout content loss")


def test_deterministic_algorithms_turn_the_split_off(monkeypatch):
    """Under kernels.backend.deterministic() (torch.use_deterministic_algorithms) each tile is
    summed by one program in a fixed order (no float atomics), so G is the same bits on every run;
    otherwise conv1_1-like shapes are split over programs."""
    kernel_class = type(triton_gram._gram_kernel)
    original_run = kernel_class.run
    splits = []

    def record(self, *args, **kwargs):
        if self.fn.__name__ == "_gram_kernel":
            splits.append(kwargs["SPLIT"])
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", record)
    x = _features(1, 64, 1009, torch.float32, "contiguous", seed=4)
    with backend.deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        out, _ = triton_gram.launch_gram(x)
    assert not torch.are_deterministic_algorithms_enabled()  # the previous state is back
    triton_gram.launch_gram(x)
    assert splits == [False, True]
    _close(out, _gram64(x), VALUE_TOLERANCE, "deterministic gram")


def test_gram_backward_is_the_symmetrised_product():
    x = _features(2, 5, 91, torch.float32, "channels_last", seed=9)
    weights = torch.randn(2, 5, 5, dtype=torch.float64)
    xt = x.clone().requires_grad_(True)
    (triton_gram.gram(xt) * weights.float().to(DEVICE)).sum().backward()
    x64 = x.double().cpu().requires_grad_(True)
    (reference.gram(x64) * weights).sum().backward()
    _close(xt.grad, x64.grad, GRAD_TOLERANCE[torch.float32], "gram gradient")


def test_non_mergeable_layout_is_copied_not_misread():
    x = torch.randn(1, 4, 6, 8, device=DEVICE).transpose(2, 3)  # H and W cannot merge
    _close(triton_gram.gram(x), _gram64(x), VALUE_TOLERANCE, "gram of a transposed tensor")


def test_rejects_bad_inputs():
    with pytest.raises(TypeError, match="fp32, bf16 and fp16"):
        triton_gram.launch_gram(torch.zeros(1, 3, 4, 4, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="target Gram must be"):
        triton_style_loss.style_loss(torch.zeros(1, 3, 16, device=DEVICE), torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="does not differentiate"):
        triton_style_loss.style_loss(torch.zeros(1, 3, 16, device=DEVICE),
                                     torch.zeros(3, 3, device=DEVICE, requires_grad=True))


def test_reference_twins_pass_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    basis = torch.randn(3, 6, generator=g, dtype=torch.float64)
    target = basis @ basis.T
    p = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(reference.gram, (x,))
    assert torch.autograd.gradcheck(lambda f: reference.style_loss(f, target, 3.0), (x,))
    assert torch.autograd.gradcheck(lambda f: reference.content_loss(f, p), (x,))


# --------------------------------------------------------------------------------------------
# Backend choice


@pytest.fixture
def fresh_backend(monkeypatch):
    monkeypatch.setattr(backend, "_chosen", None)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    return backend


def test_auto_picks_triton_only_on_cuda(fresh_backend):
    assert fresh_backend.get_backend() == "auto"
    assert fresh_backend.resolve("cpu") == "torch"
    if torch.cuda.is_available():
        assert fresh_backend.resolve("cuda") == "triton"
    assert kernels.ops("cpu").gram is reference.gram


def test_set_backend_and_environment(fresh_backend, monkeypatch):
    monkeypatch.setenv("FASTNST_BACKEND", "torch")
    assert fresh_backend.get_backend() == "torch"
    fresh_backend.set_backend("triton")  # set_backend beats the variable
    assert fresh_backend.get_backend() == "triton"
    with pytest.raises(ConfigError, match="backend must be one of auto, torch, triton, not 'cuda'"):
        fresh_backend.set_backend("cuda")
    monkeypatch.setattr(fresh_backend, "_chosen", None)
    monkeypatch.setenv("FASTNST_BACKEND", "fast")
    with pytest.raises(ConfigError, match="FASTNST_BACKEND must be one of"):
        fresh_backend.get_backend()


def test_triton_where_it_cannot_run_is_a_clear_error(fresh_backend, monkeypatch):
    monkeypatch.setattr(fresh_backend, "interpreting", lambda: False)
    with pytest.raises(ConfigError, match="cannot run on cpu: it needs a CUDA device .*TRITON_INTERPRET=1"):
        fresh_backend.resolve("cpu", "triton")
    assert fresh_backend.resolve("cpu", "auto") == "torch"


def test_interpreter_runs_triton_on_the_cpu(fresh_backend):
    if DEVICE.type == "cuda":
        pytest.skip("CUDA present: kernels run compiled, not interpreted")
    assert fresh_backend.interpreting()
    assert fresh_backend.resolve("cpu", "triton") == "triton"
    x = torch.randn(1, 8, 5, 5)
    fresh_backend.set_backend("triton")
    _close(kernels.gram(x), _gram64(x), VALUE_TOLERANCE, "kernels.gram through the backend")


def test_objective_on_triton_matches_the_torch_twins():
    from fastnst import StyleConfig
    from fastnst.objective import StyleObjective, feature_layers
    from fastnst.vgg import VGGFeatures, random_state_dict

    config = StyleConfig(size=32)
    g = torch.Generator().manual_seed(5)
    content, style, image = (torch.rand(1, 3, 32, 48, generator=g).to(DEVICE) for _ in range(3))
    net = VGGFeatures(feature_layers(config), random_state_dict(1)).to(DEVICE)
    results = {}
    for name in ("torch", "triton"):
        objective = StyleObjective(net, content, [style], config, ops=kernels.ops(DEVICE, name))
        assert objective.ops.name == name
        x = image.clone().requires_grad_(True)
        loss = objective(x)
        results[name] = (loss, torch.autograd.grad(loss, x)[0])
    _close(results["triton"][0], results["torch"][0], 1e-5, "objective loss")
    _close(results["triton"][1], results["torch"][1], 1e-4, "objective gradient")
