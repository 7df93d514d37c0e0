"""The temporal term of video stylisation (Ruder et al.): its arithmetic, its exactness under
tiling, and that it makes consecutive stylised frames agree along the motion."""

from __future__ import annotations

import pytest
import torch

from fastnst import StyleConfig
from fastnst.images import image_to_tensor, load_image, resized
from fastnst.loop import Hooks
from fastnst.config import DEFAULT_LOSS_WEIGHTS, default_temporal_weight
from fastnst.objective import StyleObjective, TemporalTarget, feature_layers, temporal_loss
from fastnst.run import Inputs, Runtime, build_run, make_objective, resolve_runtime
from fastnst.vgg import VGGFeatures, random_state_dict

from .conftest import EXAMPLES


def _temporal(shape, seed, weight):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g)
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.3).float()
    return TemporalTarget(target=target, mask=mask, weight=weight)


def test_the_temporal_term_and_its_gradient_in_float64():
    """weight * sum(mask (x - target)^2) / (3 H W) per sample, and its gradient, exactly."""
    config = StyleConfig(style_layers=("conv1_1",), content_layers=("conv1_2",), content_weight=0.0,
                         style_weight=0.0)
    g = torch.Generator().manual_seed(3)
    content, style, image = (torch.rand(2, 3, 16, 20, generator=g, dtype=torch.float64) for _ in range(3))
    temporal = _temporal((2, 3, 16, 20), 4, 7.0)
    temporal = TemporalTarget(temporal.target.double(), temporal.mask.double(), 7.0)
    net = VGGFeatures(feature_layers(config), random_state_dict(0)).double()
    objective = StyleObjective(net, content, [style[:1]], config, temporal=(temporal,))
    losses, grad = objective.loss_and_grad(image.clone().requires_grad_(True))
    d = 3 * 16 * 20
    expected = 7.0 * (temporal.mask * (image - temporal.target) ** 2).flatten(1).sum(1) / d
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, 2 * 7.0 * temporal.mask * (image - temporal.target) / d, rtol=1e-12, atol=1e-15)


def test_the_caffe_default_is_ruders_temporal_weight_on_0_to_255_images():
    """artistic-videos weighs mean(c (x - w)^2) by 1e3 on caffe's 0-255 images; fastnst's images are
    in [0, 1], so its caffe default must give the same term."""
    image, temporal = torch.rand(2, 3, 8, 10, dtype=torch.float64), _temporal((2, 3, 8, 10), 5, 1.0)
    temporal = TemporalTarget(temporal.target.double(), temporal.mask.double(), 1.0)
    ours = default_temporal_weight("gram", "caffe") * temporal_loss(image, temporal)
    ruder = 1e3 * (temporal.mask * (255 * image - 255 * temporal.target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(ours, ruder, rtol=1e-12, atol=0)


@pytest.mark.parametrize("style_loss, weights_format, documented", [
    ("gram", "torchvision", 260), ("gram", "caffe-normalised", 2.6e5), ("meancov", "torchvision", 260 * 0.015),
    ("meancov", "caffe", 6.5e7 * 0.015 / 5)])
def test_other_formats_default_temporal_weights_are_the_documented_ones(style_loss, weights_format, documented):
    """The caffe value carried to the other formats as config.py derives it (k^2 = alpha_caffe beta /
    (beta_caffe alpha), gamma / (alpha k^2) kept): the values --help and docs/video.md give."""
    caffe_alpha, caffe_beta = DEFAULT_LOSS_WEIGHTS[("gram", "caffe")]
    alpha, beta = DEFAULT_LOSS_WEIGHTS[("gram", weights_format)]
    k2 = caffe_alpha * beta / (caffe_beta * alpha)
    gram_gamma = default_temporal_weight("gram", "caffe") * alpha / (caffe_alpha * k2)
    assert default_temporal_weight("gram", weights_format) == pytest.approx(gram_gamma)
    assert default_temporal_weight(style_loss, weights_format) == pytest.approx(documented, rel=2e-3)


def test_tiled_temporal_and_tv_terms_equal_the_untiled_ones():
    config = StyleConfig(tv_weight=1e-3)
    g = torch.Generator().manual_seed(5)
    content, style, image = (torch.rand(1, 3, 96, 128, generator=g) for _ in range(3))
    network = VGGFeatures(feature_layers(config), random_state_dict(1))
    runtime = Runtime(device=torch.device("cpu"), precision="fp32", backend="torch", cuda_graph=False,
                      network=network)
    inputs = Inputs(content=content, styles=[style], temporal=(_temporal((1, 3, 96, 128), 6, 50.0),))
    untiled_losses, untiled_grad = make_objective(runtime, config, inputs).loss_and_grad(
        image.clone().requires_grad_(True))
    tiled_losses, tiled_grad = make_objective(runtime, config, inputs, tile=64).loss_and_grad(image.clone())
    torch.testing.assert_close(tiled_losses, untiled_losses, rtol=1e-4, atol=0)
    torch.testing.assert_close(tiled_grad, untiled_grad, rtol=0, atol=1e-4 * untiled_grad.abs().max().item())


def test_warped_start_and_temporal_term_make_frames_agree_along_the_motion():
    """A synthetic clip: Tübingen moving 3 px right and 2 px down per frame (known motion, DIS
    flow).  Frames rendered independently (noise start) disagree along the motion; each frame
    started from the previous stylised frame warped by the flow and held to it by the temporal
    term agrees: the consistency error is at most half (measured ~8x lower at weight 100)."""
    pytest.importorskip("cv2")
    from fastnst.flow import consistency_error, consistency_mask, optical_flow, warp

    photo = image_to_tensor(resized(load_image(EXAMPLES / "tubingen.jpg"), 100))
    style = image_to_tensor(resized(load_image(EXAMPLES / "starry_night.jpg"), 64))
    frames = [photo[..., 10 - 2 * k:58 - 2 * k, 10 - 3 * k:74 - 3 * k] for k in range(3)]
    config = StyleConfig(size=64, weights="random", device="cpu", quiet=True, iterations=20, precision="fp32")
    runtime = resolve_runtime(config)

    def render(frame, start=None, temporal=()):
        run = build_run(runtime, config, Inputs(content=frame, styles=[style], start=start, temporal=temporal))
        return run.optimise(config.iterations, Hooks(progress=False)).image

    independent = [render(frame) for frame in frames]
    sequential = [independent[0]]
    errors = {"independent": [], "temporal": []}
    for k in (1, 2):
        forward, backward = optical_flow(frames[k - 1], frames[k]), optical_flow(frames[k], frames[k - 1])
        mask = consistency_mask(forward, backward)
        warped = warp(sequential[-1], backward)
        sequential.append(render(frames[k], start=warped,
                                 temporal=(TemporalTarget(warped, mask[None, None], 100.0),)))
        errors["independent"].append(consistency_error(independent[k], independent[k - 1], backward, mask))
        errors["temporal"].append(consistency_error(sequential[k], sequential[k - 1], backward, mask))
    assert all(t <= 0.5 * i for t, i in zip(errors["temporal"], errors["independent"])), errors
