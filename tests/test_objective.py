"""The objective against the paper's formulas in float64, and the default weights against the
PyTorch tutorial's objective they were converted from."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastnst import StyleConfig
from fastnst.config import default_loss_weights
from fastnst.objective import StyleObjective, feature_layers, total_variation
from fastnst.vgg import VGGFeatures, random_state_dict

STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")


def _network(config, dtype=torch.float32):
    return VGGFeatures(feature_layers(config), random_state_dict(11), pooling=config.pooling).to(dtype)


def _images(seed=0, height=48, width=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, height, width, generator=g) for _ in range(3)]  # content, style, image


def _textbook(config, content, style, image):
    """The paper's loss in float64, written term by term from DESIGN.md; returns (terms, total)."""
    net = _network(config, torch.float64)
    layers = net.layers
    p_feats, s_feats, x_feats = net(content.double()), net(style.double()), net(image)
    terms, total = {}, 0.0
    for k, name in enumerate(config.content_layers):
        f, p = x_feats[layers.index(name)], p_feats[layers.index(name)]
        terms[f"content:{name}"] = 0.5 * ((f - p) ** 2).sum()
        v = config.content_layer_weights[k] if config.content_layer_weights else 2.0 / f[0].numel()
        total = total + config.content_weight * v * terms[f"content:{name}"]
    for k, name in enumerate(config.style_layers):
        f, s = x_feats[layers.index(name)][0], s_feats[layers.index(name)][0]
        n, m = f.shape[0], f.shape[1] * f.shape[2]
        f, s = f.reshape(n, m), s.reshape(n, m)
        g, a = f @ f.T, s @ s.T
        terms[f"style:{name}"] = ((g - a) ** 2).sum() / (4 * n**2 * m**2)
        w = config.style_layer_weights[k] if config.style_layer_weights else 4.0 / n**2
        total = total + config.style_weight * w * terms[f"style:{name}"]
    dy = image[..., 1:, :] - image[..., :-1, :]
    dx = image[..., :, 1:] - image[..., :, :-1]
    terms["tv"] = (dy**2).sum() + (dx**2).sum()
    return terms, total + config.tv_weight * terms["tv"]


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("explicit_weights", [False, True])
def test_loss_and_gradient_match_float64_textbook(pooling, explicit_weights):
    config = StyleConfig(pooling=pooling, content_weight=2.0, style_weight=3e5, tv_weight=0.5)
    if explicit_weights:  # the paper's own parametrisation: v = 1, w_l = 1/5
        config = config.replace(content_layer_weights=(1.0,), style_layer_weights=(0.2,) * 5,
                                content_weight=1e-3, style_weight=1.0)
    content, style, image = _images(seed=1)
    objective = StyleObjective(_network(config), content, [style], config)

    x32 = image.clone().requires_grad_(True)
    terms = objective.terms(x32)
    x64 = image.double().requires_grad_(True)
    expected_terms, expected_total = _textbook(config, content, style, x64)

    for name, value in expected_terms.items():
        torch.testing.assert_close(terms[name].double(), value.detach(), rtol=1e-5, atol=0, msg=name)
    torch.testing.assert_close(terms["total"].double(), expected_total.detach(), rtol=1e-5, atol=0)
    loss = objective(x32)  # the hot path gives the same total as the term-by-term report
    torch.testing.assert_close(loss, terms["total"], rtol=1e-6, atol=0)

    (grad,) = torch.autograd.grad(loss, x32)
    (expected_grad,) = torch.autograd.grad(expected_total, x64)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5 * scale)


def test_default_weights_reproduce_the_pytorch_tutorial_objective():
    """Tutorial: mse(F, P) * 1 + sum_l mse(gram/(N*M), A/(N*M)) * 1e6 over the layers used."""
    config = StyleConfig()
    content, style, image = _images(seed=2, height=64, width=80)
    net = _network(config)
    objective = StyleObjective(net, content, [style], config)

    def tutorial_gram(f):
        a, b, c, d = f.shape
        features = f.view(a * b, c * d)
        return features @ features.T / (a * b * c * d)

    with torch.no_grad():
        x_feats, p_feats, s_feats = net(image), net(content), net(style)
        content_loss = sum(F.mse_loss(x_feats[net.layers.index(n)], p_feats[net.layers.index(n)])
                           for n in config.content_layers)
        style_loss = sum(F.mse_loss(tutorial_gram(x_feats[net.layers.index(n)]),
                                    tutorial_gram(s_feats[net.layers.index(n)])) for n in config.style_layers)
        tutorial = 1e6 * style_loss + 1.0 * content_loss
        ours = objective(image)
    assert config.content_weight is None and config.style_weight is None  # the format's defaults:
    assert (objective.alpha, objective.beta) == default_loss_weights("gram", "torchvision") == (1.0, 1e6)
    torch.testing.assert_close(ours, tutorial, rtol=1e-5, atol=0)
    # The folded per-layer weights, as docs/objective.md states them.
    assert objective.style_layer_weights == tuple(4.0 / c**2 for c in (64, 128, 256, 512, 512))
    assert objective.content_layer_weights == (2.0 / (512 * 8 * 10),)


def test_style_targets_blend_and_rescale():
    config = StyleConfig(style_layers=("conv1_1", "conv2_1"))
    content, style_a, style_b = _images(seed=3)
    net = _network(config)

    def targets(styles, blend=None):
        return StyleObjective(net, content, styles, config.replace(style_blend_weights=blend)).style_targets

    only_a, only_b = targets([style_a]), targets([style_b])
    mixed = targets([style_a, style_b], (3.0, 1.0))
    for a, b, m in zip(only_a, only_b, mixed):
        torch.testing.assert_close(m, 0.75 * a + 0.25 * b, rtol=1e-5, atol=1e-3)
    # A style image of another size: its Gram is rescaled to the output's number of positions,
    # so a 2x-tiled copy of the style (same statistics, 4x the positions) gives the same targets.
    tiled = style_a.repeat(1, 1, 2, 2)
    big = targets([tiled])
    for a, t in zip(only_a, big):
        # Borders differ (zero padding at the seams); the interior dominates.
        assert (t - a).norm() / a.norm() < 0.05


def test_total_variation():
    image = torch.zeros(1, 3, 4, 5)
    image[..., 2, 3] = 1.0  # one bright pixel: four neighbours differ by 1, on three channels
    assert total_variation(image).item() == pytest.approx(12.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("style_loss", ["gram", "meancov"])
def test_normalized_gradients_scale_each_terms_gradient_at_its_layer(backend, style_loss):
    """--normalize-gradients (neural-style's): each term's gradient with respect to its layer's
    features is divided by its L1 norm (+1e-8) per sample, then weighted, and backpropagated.  The
    expected image gradient is built term by term with autograd; the losses are unchanged."""
    from fastnst.kernels.backend import ops

    config = StyleConfig(style_layers=("conv1_1", "conv2_1"), content_layers=("conv2_2",), style_loss=style_loss,
                         normalize_gradients=True, content_weight=2.0, style_weight=5.0)
    content, style, image = _images(seed=6, height=32, width=32)
    image = torch.cat([image, image.flip(-1)])  # two samples: norms are per sample
    net = _network(config)
    kernels = ops("cpu", backend)
    objective = StyleObjective(net, content.expand(2, -1, -1, -1), [style], config, ops=kernels)
    losses, grad = objective.loss_and_grad(image.clone().requires_grad_(True))
    plain = StyleObjective(net, content.expand(2, -1, -1, -1), [style], config.replace(normalize_gradients=False),
                           ops=kernels)
    torch.testing.assert_close(losses, plain.losses(image).detach())

    x = image.clone().requires_grad_(True)
    features = net(x)
    expected = torch.zeros_like(image)
    terms = [(features[0], lambda f: kernels.content_losses(f, objective.content_targets[0]),
              2.0 * objective.content_layer_weights[0])]
    for slot, target, w in zip(objective.style_slots, objective.style_targets, objective.style_layer_weights):
        loss = kernels.meancov_losses if style_loss == "meancov" else kernels.style_losses
        terms.append((features[slot], lambda f, loss=loss, target=target: loss(f, target), 5.0 * w))
    for feature, term, weight in terms:
        (direction,) = torch.autograd.grad(term(feature).sum(), feature, retain_graph=True)
        norm = direction.abs().flatten(1).sum(1).view(-1, 1, 1, 1)
        (part,) = torch.autograd.grad(feature, x, grad_outputs=weight * direction / (norm + 1e-8), retain_graph=True)
        expected += part
    # fp32; the meancov terms' 16 Newton-Schulz products round differently in the two graphs (2e-5
    # of the largest entry measured), hence 1e-4 of it.
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert not torch.allclose(grad, torch.autograd.grad(plain(x), x)[0], rtol=0.1)


def test_normalized_gradients_carry_the_fp16_loss_scale():
    """Under fp16 loss scaling the gradient is the scaled one (the scaler divides it back), so
    --normalize-gradients must keep the scale: scale 8 gives 8 times the unscaled gradient."""
    config = StyleConfig(style_layers=("conv1_1", "conv2_1"), content_layers=("conv2_2",), normalize_gradients=True)
    content, style, image = _images(seed=7, height=32, width=32)
    objective = StyleObjective(_network(config), content, [style], config)
    _, plain = objective.loss_and_grad(image.clone().requires_grad_(True))
    _, scaled = objective.loss_and_grad(image.clone().requires_grad_(True), torch.tensor(8.0))
    torch.testing.assert_close(scaled, 8.0 * plain, rtol=1e-5, atol=1e-7 * plain.abs().max().item())
