"""Optical flow between video frames, warping, and where a warped frame can be trusted.

The temporal consistency of Ruder, Dosovitskiy & Brox (*Artistic style transfer for videos*, GCPR
2016) needs, for each new frame, the previous stylised frame carried along the motion and a mask
of the pixels where that carrying is right.  Conventions (all flows in pixels, (dx, dy) per pixel
of the grid they are defined on):

- ``optical_flow(a, b)`` is the flow from frame a to frame b: a's pixel p shows the same point as
  b's pixel p + flow(p).  Computed by OpenCV's DIS (dense inverse search) on the CPU: no weights,
  a few milliseconds per 512 px frame; or by torchvision's RAFT on the device (``--flow raft``),
  whose weights are fetched once like VGG19's.
- ``warp(image, flow)`` samples ``image`` at p + flow(p): with the flow from the *new* frame to the
  previous one it carries the previous frame onto the new frame's grid.
- ``consistency_mask(forward, backward)``: 1 where the new frame's pixel is seen in the previous
  frame and not on a motion boundary, 0 elsewhere, by Ruder et al.'s forward-backward test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .vgg import hub_cache_path, hub_state_dict

# Ruder et al. (2016), section 3.2: a pixel is occluded where the forward flow, carried back along
# the backward flow, does not cancel it: |w~ + w^|^2 > 0.01 (|w~|^2 + |w^|^2) + 0.5, and on a
# motion boundary where |grad u^|^2 + |grad v^|^2 > 0.01 |w^|^2 + 0.002.
OCCLUSION_RELATIVE, OCCLUSION_ABSOLUTE = 0.01, 0.5
BOUNDARY_RELATIVE, BOUNDARY_ABSOLUTE = 0.01, 0.002


def _grey_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) RGB in [0, 1] -> (H, W) uint8 luma, what DIS reads."""
    rgb = image.detach().reshape(-1, *image.shape[-2:])[-3:].float().cpu().clamp(0, 1)
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (luma * 255).round().to(torch.uint8).numpy()


def optical_flow(a: torch.Tensor, b: torch.Tensor, method: str = "dis",
                 device: torch.device | None = None) -> torch.Tensor:
    """(H, W, 2) fp32 flow (on the CPU) from frame ``a`` to frame ``b`` (RGB in [0, 1], same size):
    by DIS (OpenCV, CPU) or by RAFT (torchvision's pretrained raft_large, on ``device``)."""
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"frames of different sizes: {tuple(a.shape[-2:])} and {tuple(b.shape[-2:])}")
    if method == "raft":
        return _raft_flow(a, b, device or torch.device("cpu"))
    if method != "dis":
        raise ValueError(f"unknown flow method '{method}' (use {', '.join(FLOWS)})")
    try:
        import cv2
    except ImportError:
        raise ConfigError("optical flow needs OpenCV: pip install opencv-python-headless "
                          "(or pip install 'fastnst[video]')") from None
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flow = dis.calc(_grey_uint8(a), _grey_uint8(b), None)
    return torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32))


FLOWS = ("dis", "raft")
# RAFT's refinement iterations (torchvision's default).
RAFT_UPDATES = 12
RAFT_MIN_SIDE = 128
_raft_models: dict[str, torch.nn.Module] = {}


def raft_cache_path() -> Path:
    """Where torch hub keeps (or will keep) the RAFT weights."""
    from torchvision.models.optical_flow import Raft_Large_Weights

    return hub_cache_path(Raft_Large_Weights.C_T_SKHT_V2)


def _raft(device: torch.device) -> torch.nn.Module:
    """torchvision's raft_large with its C+T+S+K+H weights, fetched once into the torch hub cache
    (as VGG19's are) and kept per device for the process."""
    key = str(device)
    if key not in _raft_models:
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large

        state = hub_state_dict(Raft_Large_Weights.C_T_SKHT_V2, "the RAFT weights", "--flow dis")
        model = raft_large(weights=None)
        model.load_state_dict(state)
        _raft_models[key] = model.eval().requires_grad_(False).to(device)
    return _raft_models[key]


@torch.no_grad()
def _raft_flow(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> torch.Tensor:
    height, width = a.shape[-2:]
    # RAFT needs multiples of 8 px and at least 128 px a side (its correlation pyramid): the edges
    # are replicated up to that and the flow cropped back.
    pad = (0, max(RAFT_MIN_SIDE, width + -width % 8) - width, 0, max(RAFT_MIN_SIDE, height + -height % 8) - height)

    def prepared(image: torch.Tensor) -> torch.Tensor:
        image = image.reshape(-1, 3, height, width)[-1:].float().to(device)
        return F.pad(image * 2.0 - 1.0, pad, mode="replicate")  # RAFT reads [-1, 1]

    flows = _raft(device)(prepared(a), prepared(b), num_flow_updates=RAFT_UPDATES)
    return flows[-1][0, :, :height, :width].permute(1, 2, 0).float().cpu().contiguous()


def _destinations(flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of p + flow(p) for every pixel p, in pixels, each (H, W) fp32."""
    height, width = flow.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=flow.device),
                            torch.arange(width, dtype=torch.float32, device=flow.device), indexing="ij")
    return xs + flow[..., 0], ys + flow[..., 1]


def _sampling_grid(flow: torch.Tensor) -> torch.Tensor:
    """(1, H, W, 2) grid_sample coordinates of p + flow(p), normalised to [-1, 1] (pixel centres)."""
    height, width = flow.shape[:2]
    x, y = _destinations(flow)
    return torch.stack([x * (2.0 / max(width - 1, 1)) - 1.0, y * (2.0 / max(height - 1, 1)) - 1.0], dim=-1)[None]


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``image`` (B, C, H, W) sampled at p + flow(p) (bilinear; outside the frame: the border)."""
    grid = _sampling_grid(flow.to(image.device)).expand(image.shape[0], -1, -1, -1)
    return F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)


def consistency_mask(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """(H, W) fp32 in {0, 1} on the new frame's grid: ``backward`` is the flow new -> previous,
    ``forward`` previous -> new.  0 where the pixel is occluded in the previous frame, falls outside
    it, or sits on a motion boundary (Ruder et al.), 1 where the warped previous frame can be trusted."""
    carried = warp(forward.permute(2, 0, 1)[None], backward)[0].permute(1, 2, 0)  # w~(p) = w(p + w^(p))
    occluded = (carried + backward).square().sum(-1) > (
        OCCLUSION_RELATIVE * (carried.square().sum(-1) + backward.square().sum(-1)) + OCCLUSION_ABSOLUTE)
    du_dy, du_dx = torch.gradient(backward[..., 0])
    dv_dy, dv_dx = torch.gradient(backward[..., 1])
    gradient = du_dx.square() + du_dy.square() + dv_dx.square() + dv_dy.square()
    boundary = gradient > BOUNDARY_RELATIVE * backward.square().sum(-1) + BOUNDARY_ABSOLUTE
    return (~(occluded | boundary | _leaves_the_frame(backward))).float()


def _leaves_the_frame(flow: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: p + flow(p) falls outside the frame (the other frame does not show p)."""
    height, width = flow.shape[:2]
    x, y = _destinations(flow)
    return (x < 0) | (x > width - 1) | (y < 0) | (y > height - 1)


def consistency_error(current: torch.Tensor, previous: torch.Tensor, backward: torch.Tensor,
                      mask: torch.Tensor) -> float:
    """The temporal-consistency metric: the mean absolute difference (in [0, 1] units) between
    ``current`` and ``previous`` warped onto it by ``backward`` (current -> previous), over the
    pixels ``mask`` trusts; 0.0 when it trusts none."""
    difference = (current.float() - warp(previous, backward)).abs().mean(dim=(0, 1))
    trusted = mask.to(difference.device)
    total = float(trusted.sum())
    return float((difference * trusted).sum()) / total if total else 0.0
