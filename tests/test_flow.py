"""Optical flow, warping and consistency masks against known motion: a photo translated by a
whole number of pixels, so the true flow is known everywhere."""

from __future__ import annotations

import pytest
import torch

from fastnst.flow import consistency_error, consistency_mask, optical_flow, warp
from fastnst.images import image_to_tensor, load_image, resized

from .conftest import EXAMPLES

pytest.importorskip("cv2")

SHIFT = (3, 2)  # (dx, dy): the scene moves 3 px right and 2 px down from frame a to frame b


@pytest.fixture(scope="module")
def frames():
    """Two 128 x 96 crops of Tübingen: b(p) = a(p - SHIFT)."""
    photo = image_to_tensor(resized(load_image(EXAMPLES / "tubingen.jpg"), 160))
    dx, dy = SHIFT
    a = photo[..., 10:106, 10:138]
    b = photo[..., 10 - dy:106 - dy, 10 - dx:138 - dx]
    return a, b


def test_dis_flow_recovers_the_translation(frames):
    a, b = frames
    forward, backward = optical_flow(a, b), optical_flow(b, a)
    assert forward.shape == (96, 128, 2) and forward.dtype == torch.float32
    inner = (slice(16, -16), slice(16, -16))
    truth = torch.tensor(SHIFT, dtype=torch.float32)
    assert (forward[inner] - truth).abs().median() < 0.1 and (backward[inner] + truth).abs().median() < 0.1
    assert ((forward[inner] - truth).norm(dim=-1) < 0.5).float().mean() > 0.95


def test_warp_samples_at_p_plus_flow():
    """Exact on a whole-pixel flow: the warped image is the shifted one, the border repeated."""
    image = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    flow = torch.zeros(12, 16, 2)
    flow[..., 0], flow[..., 1] = 2.0, -1.0
    warped = warp(image, flow)
    torch.testing.assert_close(warped[..., 1:, :14], image[..., :11, 2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(warped[..., 0, :14], image[..., 0, 2:], rtol=0, atol=1e-5)  # border row


def test_the_warped_frame_matches_and_the_mask_marks_what_entered(frames):
    a, b = frames
    forward, backward = optical_flow(a, b), optical_flow(b, a)
    mask = consistency_mask(forward, backward)
    dx, dy = SHIFT
    assert mask[:, :dx].sum() == 0 and mask[:dy].sum() == 0  # entered the frame: not in a
    assert mask[8:-8, 8:-8].mean() > 0.99
    unwarped = (a - b)[..., 8:-8, 8:-8].abs().mean()
    assert (warp(a, backward) - b)[..., 8:-8, 8:-8].abs().mean() < 0.05 * unwarped
    assert consistency_error(b, a, backward, mask) < 0.1 * unwarped


def test_occlusion_by_forward_backward_disagreement():
    """Flows that do not cancel (an object that moved where the backward flow says nothing
    moved) are occluded; flows that cancel are trusted; a sharp flow edge is a motion boundary."""
    backward = torch.zeros(20, 20, 2)
    forward = torch.zeros(20, 20, 2)
    forward[5:10, 5:10, 0] = 4.0  # moved 4 px, but the backward flow says it stayed
    mask = consistency_mask(forward, backward)
    assert mask[5:10, 5:10].sum() == 0 and mask[12:, 12:].min() == 1
    step = torch.zeros(20, 20, 2)
    step[:, 10:, 0] = -3.0  # the right half moved: its forward flow is +3 there, consistent
    forward = torch.zeros(20, 20, 2)
    forward[:, 7:, 0] = 3.0
    mask = consistency_mask(forward, step)
    assert mask[:, 9:11].sum() == 0  # the boundary between the halves
    assert mask[:, 13:].min() == 1 and mask[:, :7].min() == 1
    assert mask[:, 7:10].sum() == 0  # uncovered: the previous frame showed the half that moved away there


def test_raft_offline_is_one_clear_error(monkeypatch):
    from urllib.error import URLError

    from torchvision.models.optical_flow import Raft_Large_Weights

    from fastnst import flow
    from fastnst.errors import WeightsError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(Raft_Large_Weights, "get_state_dict", offline)
    monkeypatch.setattr(flow, "_raft_models", {})
    frame = torch.rand(1, 3, 40, 48)
    with pytest.raises(WeightsError) as error:
        optical_flow(frame, frame, "raft")
    message = str(error.value)
    assert "cannot download the RAFT weights" in message and str(flow.raft_cache_path()) in message
    assert "--flow dis" in message and "\n" not in message


def test_raft_runs_on_frames_of_any_size(monkeypatch):
    """The RAFT path with seeded random weights (the real ones cannot be downloaded here): frames
    that are not multiples of 8 px are padded and the flow cropped back, (H, W, 2) fp32 on the CPU.
    Its accuracy is torchvision's to answer for; the GPU check can compare it with DIS."""
    from torchvision.models.optical_flow import Raft_Large_Weights, raft_large

    from fastnst import flow

    torch.manual_seed(0)
    state = raft_large(weights=None).state_dict()
    monkeypatch.setattr(Raft_Large_Weights, "get_state_dict", lambda *args, **kwargs: state)
    monkeypatch.setattr(flow, "_raft_models", {})
    monkeypatch.setattr(flow, "RAFT_UPDATES", 2)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 3, 38, 50, generator=g), torch.rand(1, 3, 38, 50, generator=g)
    result = optical_flow(a, b, "raft")
    assert result.shape == (38, 50, 2) and result.dtype == torch.float32 and torch.isfinite(result).all()
