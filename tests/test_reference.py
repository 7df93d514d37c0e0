"""The pure-PyTorch twins against float64 loops written straight from DESIGN.md's formulas."""

from __future__ import annotations

import pytest
import torch

from fastnst.kernels import reference


def _gram64(f):
    """G[i, j] = sum_k F[i, k] F[j, k] for one (C, M) matrix, in float64."""
    f = f.double()
    return torch.stack([torch.stack([(f[i] * f[j]).sum() for j in range(f.shape[0])]) for i in range(f.shape[0])])


@pytest.mark.parametrize("batch, channels, height, width", [(1, 3, 7, 11), (3, 5, 1, 97), (2, 16, 8, 8)])
def test_gram_matches_float64(batch, channels, height, width):
    x = torch.randn(batch, channels, height, width)
    out = reference.gram(x)
    assert out.dtype == torch.float32 and out.shape == (batch, channels, channels)
    for b in range(batch):
        expected = _gram64(x[b].reshape(channels, -1))
        torch.testing.assert_close(out[b].double(), expected, rtol=1e-5, atol=1e-5)


def test_gram_accepts_flattened_and_low_precision_inputs():
    x = torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(reference.gram(x.flatten(2)), reference.gram(x))
    half = x.to(torch.bfloat16)
    assert reference.gram(half).dtype == torch.float32
    torch.testing.assert_close(reference.gram(half), reference.gram(half.float()))


@pytest.mark.parametrize("shared_target", [True, False])
def test_style_loss_value_and_gradient(shared_target):
    batch, channels, positions, weight = 2, 6, 37, 2.5
    x = torch.randn(batch, channels, positions, dtype=torch.float64)
    # Targets are Grams, hence symmetric (the gradient formula relies on it).
    base = torch.randn(channels, 2 * channels, dtype=torch.float64)
    target = base @ base.T
    if not shared_target:
        noise = torch.randn(batch, channels, channels, dtype=torch.float64)
        target = target + noise + noise.transpose(1, 2)
    expected = 0.0
    for b in range(batch):
        a = target if shared_target else target[b]
        expected += weight / (4 * channels**2 * positions**2) * ((_gram64(x[b]) - a) ** 2).sum()
    x32 = x.float().requires_grad_(True)
    loss = reference.style_loss(x32, target.float(), weight=weight)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    loss.backward()
    # dE/dF = weight / (C^2 M^2) (G - A) F, per batch element (DESIGN.md).
    for b in range(batch):
        a = target if shared_target else target[b]
        grad = weight / (channels**2 * positions**2) * (_gram64(x[b]) - a) @ x[b]
        torch.testing.assert_close(x32.grad[b].double(), grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())


def test_content_loss_value_and_gradient():
    x = torch.randn(1, 4, 9, 13, dtype=torch.float64)
    target = torch.randn_like(x)
    x32 = x.float().requires_grad_(True)
    loss = reference.content_loss(x32, target.float())
    torch.testing.assert_close(loss.double(), 0.5 * ((x - target) ** 2).sum(), rtol=1e-5, atol=0)
    loss.backward()
    torch.testing.assert_close(x32.grad.double(), x - target, rtol=1e-5, atol=1e-6)


def test_bad_feature_shape_is_rejected():
    with pytest.raises(ValueError, match="features must have shape"):
        reference.gram(torch.zeros(3, 4))


def test_style_loss_gradient_with_an_asymmetric_target():
    """The written-out backward uses (D + D^T) F, right for any A, not only for Grams."""
    x = torch.randn(2, 4, 23, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 4, dtype=torch.float64) * 10
    (grad,) = torch.autograd.grad(reference.style_loss(x, target, 2.0), x)
    expected_loss = sum(2.0 / (4 * 16 * 23**2) * ((_gram64(x[b].detach()) - target) ** 2).sum() for b in range(2))
    torch.testing.assert_close(reference.style_loss(x, target, 2.0).detach(), expected_loss)
    y = x.detach().clone().requires_grad_(True)
    plain = sum(2.0 / (4 * 16 * 23**2) * ((y[b] @ y[b].T - target) ** 2).sum() for b in range(2))
    (expected,) = torch.autograd.grad(plain, y)
    torch.testing.assert_close(grad, expected)


AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _gram_f64(x):
    f = x.double().flatten(2)
    return f @ f.transpose(1, 2)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gram_under_autocast_stays_fp32(autocast_dtype, feature_dtype):
    """Autocast casts the operands of @ to 16 bits; the twin must not let it (the issue's case:
    fp32 features (1, 64, 4096) under bf16 autocast gave a bf16 G, 3.6e-3 off).  The result equals
    the Gram of the same features in float64 to fp32 rounding."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 64, 64, 64, generator=g).to(feature_dtype)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = reference.gram(x)
    assert out.dtype == torch.float32
    expected = _gram_f64(x)
    error = (out.double() - expected).abs().max() / expected.abs().max()
    assert error < 2e-6, f"relative error {error:.3g}"


def test_gram_of_fp16_features_under_fp16_autocast_does_not_overflow():
    """G ~ M F^2 passes fp16's 65504 at conv1_1 sizes; accumulated in fp32 it stays finite."""
    x = torch.full((1, 8, 4096), 4.0, dtype=torch.float16)  # every G entry is 4096 * 16 = 65536
    with torch.autocast("cpu", dtype=torch.float16):
        out = reference.gram(x)
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((1, 8, 8), 65536.0))


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
def test_style_and_content_losses_under_autocast_match_float64(autocast_dtype):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 32, 16, 16, generator=g).to(autocast_dtype)
    basis = torch.randn(32, 64, generator=g, dtype=torch.float64)
    target = basis @ basis.T * 4.0
    content_target = torch.randn(2, 32, 16, 16, generator=g).to(autocast_dtype)
    weight = float(32 * 256)
    leaf = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype):
        style = reference.style_loss(leaf, target.float(), weight)
        content = reference.content_loss(leaf, content_target)
    assert style.dtype == torch.float32 and content.dtype == torch.float32
    (grad,) = torch.autograd.grad(style, leaf)

    x64 = x.double().requires_grad_(True)
    expected = reference.style_loss(x64, target, weight)
    (expected_grad,) = torch.autograd.grad(expected, x64)
    torch.testing.assert_close(style.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(content.double(), reference.content_loss(x.double(), content_target.double()),
                               rtol=1e-5, atol=0)
    # The gradient is returned in the features' 16-bit dtype: one rounding of that dtype.
    tolerance = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[autocast_dtype]
    assert grad.dtype == autocast_dtype
    error = (grad.double() - expected_grad).abs().max() / expected_grad.abs().max()
    assert error <= tolerance, f"gradient relative error {error:.3g}"


def test_per_sample_losses_are_each_samples_own():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64)
    basis = torch.randn(3, 5, 9, generator=g, dtype=torch.float64)
    targets = basis @ basis.transpose(1, 2)  # one target per sample
    content_target = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64)
    style = reference.style_losses(x, targets, 2.0)
    content = reference.content_losses(x, content_target)
    assert style.shape == content.shape == (3,)
    for b in range(3):
        alone = x[b:b + 1]
        torch.testing.assert_close(style[b], reference.style_loss(alone, targets[b], 2.0), rtol=1e-12, atol=0)
        torch.testing.assert_close(content[b], 0.5 * (alone - content_target[b]).square().sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(reference.style_loss(x, targets, 2.0), style.sum(), rtol=1e-12, atol=0)
