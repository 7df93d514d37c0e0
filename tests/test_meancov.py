"""The mean-covariance (Wasserstein-2) style loss against float64 textbook arithmetic, on both
kernel backends (Triton's Gram through the interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from fastnst import StyleConfig
from fastnst.kernels.backend import ops
from fastnst.kernels.meancov import COVARIANCE_EPS, MeanCovTarget, meancov_losses, sqrtm_newton_schulz
from fastnst.objective import StyleObjective, feature_layers
from fastnst.vgg import VGGFeatures, random_state_dict


def _spd(c: int, conditioning: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    return (basis * torch.logspace(0, -conditioning, c, dtype=torch.float64)) @ basis.T


def _exact_sqrt(a: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(a)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


@pytest.mark.parametrize("conditioning", [0, 2, 4])
def test_newton_schulz_square_root_in_float64(conditioning):
    """Condition number up to 1e4 (the regularised covariances of small images): 16 iterations give
    the square root to 1e-9 relative; a batch is each matrix's own."""
    a = torch.stack([_spd(24, conditioning, seed) for seed in (1, 2)]) * 37.0
    root = sqrtm_newton_schulz(a)
    for k in range(2):
        exact = _exact_sqrt(a[k])
        assert ((root[k] - exact).abs().max() / exact.abs().max()).item() < 1e-9
        torch.testing.assert_close(root[k] @ root[k], a[k], rtol=1e-8, atol=1e-8 * a[k].abs().max().item())


def _textbook_w2(x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """(B,) squared W2 distance between the Gaussians of x's and style's features, per channel,
    by eigendecompositions in float64 (B, C, M features; style (C, M))."""
    losses = []
    s = style.double()
    mu_t = s.mean(1)
    cov_t = s @ s.T / s.shape[1] - torch.outer(mu_t, mu_t) + COVARIANCE_EPS * torch.eye(s.shape[0], dtype=torch.float64)
    root_t = _exact_sqrt(cov_t)
    for f in x.double():
        mu = f.mean(1)
        cov = f @ f.T / f.shape[1] - torch.outer(mu, mu) + COVARIANCE_EPS * torch.eye(f.shape[0], dtype=torch.float64)
        cross = _exact_sqrt(root_t @ cov @ root_t)
        losses.append(((mu - mu_t).square().sum() + cov.trace() + cov_t.trace() - 2 * cross.trace()) / f.shape[0])
    return torch.stack(losses)


def _features(c=16, m=300, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(batch, c, m, generator=g) + 0.3)
    style = torch.relu(torch.randn(c, m + 37, generator=g) * 1.5)
    return x, style


def _target(style: torch.Tensor) -> MeanCovTarget:
    s = style.float()
    return MeanCovTarget.from_moments(s.mean(1), s @ s.T / s.shape[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_matches_the_float64_textbook(backend):
    x, style = _features()
    ours = ops("cpu", backend).meancov_losses(x, _target(style))
    expected = _textbook_w2(x, style)
    assert ours.dtype == torch.float32 and ours.shape == (2,)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5 * expected.max().item())
    # The loss of the style's own statistics is zero up to Newton-Schulz's error: the product
    # there is Sigma_t^2, whose smallest eigenvalues (condition ~1e8) the 16 iterations do not
    # fully reach (measured 3e-7 of the loss scale).
    own = meancov_losses(style[None].double(), _target(style.double()))
    assert own.abs().item() < 1e-5 * expected.max().item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_matches_the_float64_textbook(backend):
    """The gradient through Newton-Schulz (autograd) against the gradient of the eigendecomposition
    form (autograd through eigh, float64), on well-separated eigenvalues."""
    x, style = _features(c=8, m=120, batch=2, seed=3)
    ours_in = x.clone().requires_grad_(True)
    ops("cpu", backend).meancov_losses(ours_in, _target(style)).sum().backward()
    exact_in = x.double().requires_grad_(True)
    _textbook_w2(exact_in, style).sum().backward()
    torch.testing.assert_close(ours_in.grad.double(), exact_in.grad, rtol=1e-3,
                               atol=1e-4 * exact_in.grad.abs().max().item())


def test_float64_gradcheck():
    x, style = _features(c=5, m=40, batch=2, seed=5)
    target = _target(style.double())
    assert torch.autograd.gradcheck(lambda f: meancov_losses(f, target), (x.double().requires_grad_(True),))


def test_per_sample_targets_and_bf16_features():
    """Two samples with their own targets equal two single computations; bf16 features (autocast)
    give fp32 losses close to the fp32 ones."""
    x, style = _features(batch=2, seed=7)
    _, other = _features(batch=1, seed=8)
    both = MeanCovTarget.stack([_target(style), _target(other)])
    together = meancov_losses(x, both)
    alone = torch.cat([meancov_losses(x[:1], _target(style)),
                       meancov_losses(x[1:], _target(other))])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = meancov_losses(x.bfloat16(), _target(style))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, meancov_losses(x, _target(style)), rtol=3e-2, atol=0)


def test_the_objective_blends_moments_and_reaches_zero_at_the_style():
    """--style-loss meancov in the objective: the style image's own features have (almost) zero
    style loss and its targets blend means and second moments linearly.  "Almost": conv3_1 of a
    32 x 40 image has 80 positions for 256 channels, so its covariance has 176 eigenvalues of
    eps = 1e-4 and the Newton-Schulz product's are eps^2, below what 16 iterations resolve; the
    floor this leaves was measured at 0.6% of the loss at the content image."""
    config = StyleConfig(style_loss="meancov", style_layers=("conv1_1", "conv2_1", "conv3_1"),
                         content_layers=("conv2_2",), content_weight=0.0)
    g = torch.Generator().manual_seed(9)
    content, style, other = (torch.rand(1, 3, 32, 40, generator=g) for _ in range(3))
    net = VGGFeatures(feature_layers(config), random_state_dict(1))
    objective = StyleObjective(net, content, [style], config)
    at_style = objective(style).item()
    at_content = objective(content).item()
    assert at_style < 1e-2 * at_content
    blended = StyleObjective(net, content, [style, other], config.replace(style_blend_weights=(3.0, 1.0)))
    slot = net.layers.index("conv2_1")
    features = net(style)[slot], net(other)[slot]
    means = [f.flatten(2).mean(2)[0] for f in features]
    torch.testing.assert_close(blended.style_targets[1].mean, 0.75 * means[0] + 0.25 * means[1], rtol=1e-5, atol=1e-6)


def test_a_batch_with_its_own_styles_equals_its_samples_alone():
    """Per-sample meancov targets (batch rendering): each sample's loss is what it has alone."""
    config = StyleConfig(style_loss="meancov", style_layers=("conv1_1", "conv2_1"), content_layers=("conv2_2",))
    g = torch.Generator().manual_seed(10)
    contents, styles, images = (torch.rand(2, 3, 32, 32, generator=g) for _ in range(3))
    net = VGGFeatures(feature_layers(config), random_state_dict(2))
    together = StyleObjective(net, contents, [[styles[0:1]], [styles[1:2]]], config).losses(images)
    for b in range(2):
        alone = StyleObjective(net, contents[b:b + 1], [styles[b:b + 1]], config).losses(images[b:b + 1])
        torch.testing.assert_close(together[b:b + 1], alone, rtol=1e-5, atol=0)
