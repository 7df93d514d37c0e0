"""Mixed precision on the CPU: autocast runs, fp16 loss scaling skips overflowed steps, and the
step is a pure function of the image and the optimiser state (what CUDA-graph replay relies on)."""

from __future__ import annotations

import pytest
import torch

from fastnst import StyleConfig, render
from fastnst.errors import ConfigError
from fastnst.objective import Autograd, StyleObjective, feature_layers
from fastnst.optim import LBFGS, Adam
from fastnst.precision import LossScaler, autocast_for, precision_reason, resolve_precision
from fastnst.run import initial_image, make_step
from fastnst.vgg import VGGFeatures, random_state_dict


def test_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp16", cpu) == "fp16"
    assert resolve_precision("fp32", cpu) == "fp32" and precision_reason("fp32", cpu) == "asked for"
    with pytest.raises(ConfigError, match="--precision must be one of"):
        resolve_precision("fp8", cpu)
    # auto follows the processor: bf16 with AMX or AVX-512 BF16, fp32 without either.
    for amx, avx512_bf16, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert resolve_precision("auto", cpu) == expected
        reason = precision_reason("auto", cpu)
        assert ("AMX instructions" in reason) == amx and ("AVX-512 BF16 instructions" in reason) == avx512_bf16
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert resolve_precision("auto", cpu) == "fp32"  # a torch without the probes: the safe choice


def test_bf16_autocast_tracks_fp32(content_path, style_path, small_config):
    """Adam's trajectory is smooth, so the bf16 run's loss after 20 iterations stays within 3% of
    the fp32 run's (measured: within 1% for seeds 0-2; the objective itself differs by ~0.2% in
    bf16).  L-BFGS amplifies rounding differences, so for it we check that bf16 still converges."""
    config = small_config.replace(optimizer="adam")
    fp32 = render(content_path, style_path, config, precision="fp32")
    bf16 = render(content_path, style_path, config, precision="bf16")
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.03)
    assert bf16.losses[0][1] == pytest.approx(fp32.losses[0][1], rel=0.01)
    lbfgs = render(content_path, style_path, small_config, precision="bf16")
    assert lbfgs.loss < 0.5 * lbfgs.losses[0][1]


def test_fp16_with_loss_scaling_runs_without_nan(content_path, style_path, small_config):
    result = render(content_path, style_path, small_config, precision="fp16")
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    assert result.loss < 0.5 * result.losses[0][1]
    # A skipped step leaves the image as it was, so the next loss read repeats the last one exactly; a
    # step taken moves it.  The count reported must be those repeats (plus a skip at the very last
    # iteration, which no later read can show).  How many steps overflow depends on the trajectory
    # (measured here: one, where L-BFGS overshoots and the gradient needs a scale under 2^16).
    losses = [loss for _, loss in result.losses]
    repeats = sum(before == after for before, after in zip(losses, losses[1:]))
    assert repeats <= result.skipped_steps <= repeats + 1 and torch.isfinite(result.image).all()


@pytest.mark.parametrize("optimizer", [LBFGS, Adam])
def test_overflowed_step_is_skipped_and_the_scale_lowered(optimizer):
    image = torch.full((1, 3, 4, 4), 0.5, requires_grad=True)
    opt = optimizer(image, lr=0.01) if optimizer is Adam else optimizer(image, lr=0.01, history=3)
    scaler = LossScaler(image.device, initial=2.0**16, interval=2)
    # The gradient passes through fp16 as scale * 300, which overflows fp16 (max 65504) until
    # the scale is down to 128: nine halvings.
    step = make_step(Autograd(lambda x: (x.half() * 300).float().sum()), opt, scaler=scaler)
    start = image.detach().clone()

    def tensors():
        return [t.clone() for t in opt.state_tensors()]

    before = tensors()
    assert len(before) >= 3
    step(image)
    assert scaler.skipped.item() == 1 and scaler.scale.item() == 2.0**15
    assert torch.equal(image.detach(), start)  # a skipped step changes nothing
    assert all(torch.equal(value, saved) for value, saved in zip(tensors(), before))
    while torch.equal(image.detach(), start):
        assert scaler.skipped.item() < 20, "the scale never came down"
        step(image)
    assert scaler.skipped.item() == 9 and scaler.scale.item() == 128.0
    assert torch.isfinite(image).all() and image.detach().max().item() < 0.5
    step(image)  # the second good step in a row doubles the scale ...
    assert scaler.scale.item() == 256.0
    moved = image.detach().clone()
    step(image)  # ... which overflows again: skipped, nothing moves
    assert scaler.skipped.item() == 10 and torch.equal(image.detach(), moved)


def test_scale_never_drops_below_one():
    scaler = LossScaler(torch.device("cpu"), initial=4.0)
    for _ in range(5):
        scaler.update(torch.tensor(False))
    assert scaler.scale.item() == 1.0 and scaler.skipped.item() == 5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_the_step_is_pure(precision, optimizer):
    """Same image and optimiser state in, same loss, image and state out: the step keeps no hidden
    state, so replaying it from a CUDA graph computes what the eager loop computes."""
    config = StyleConfig(size=32, style_layers=("conv1_1", "conv2_1", "conv3_1"), content_layers=("conv2_2",))
    g = torch.Generator().manual_seed(8)
    content, style = torch.rand(1, 3, 32, 40, generator=g), torch.rand(1, 3, 32, 40, generator=g)
    net = VGGFeatures(feature_layers(config), random_state_dict(3))
    autocast = autocast_for(precision, torch.device("cpu"))
    objective = StyleObjective(net, content, [style], config, autocast=autocast)
    image = initial_image("noise", content, style, 0).requires_grad_(True)
    opt = LBFGS(image, history=4) if optimizer == "lbfgs" else Adam(image)
    step = make_step(objective, opt)
    for _ in range(3):  # fill some history first
        step(image)

    def state():
        return [image.detach().clone()] + [t.clone() for t in opt.state_tensors()]

    before = state()
    first_loss = step(image).clone()
    first = state()
    with torch.no_grad():
        for live, saved in zip([image] + opt.state_tensors(), before):
            live.copy_(saved)
    second_loss = step(image)
    assert torch.equal(first_loss, second_loss)
    for a, b in zip(first, state()):
        assert torch.equal(a, b)
