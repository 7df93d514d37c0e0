"""Colour control (Gatys, Bethge, Hertzmann & Shechtman, "Controlling Perceptual Factors in
Neural Style Transfer", CVPR 2017, section 5).

``luminance``: the transfer runs on luminance only.  Content and style become grey images of their
luminance (Y of YIQ), the style's luminance is shifted and scaled to the content's mean and
variance, and the result's luminance is recombined with the content's chroma (I, Q), so the
output keeps the photo's colours exactly (up to clipping into [0, 1] and 8-bit rounding).

``histogram``: before the transfer, each style image's RGB colours are mapped by an affine map
x -> A (x - mu_s) + mu_c with A = Sigma_c^(1/2) Sigma_s^(-1/2), so that their mean and covariance
equal the content's; the transfer then runs in full colour.
"""

from __future__ import annotations

import torch

MODES = ("none", "luminance", "histogram")

# NTSC YIQ, as used by the paper's luminance transfer.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.595716, -0.274453, -0.321263],
                            [0.211456, -0.522591, 0.311135]], dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _apply(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", matrix.to(image.dtype).to(image.device), image)


def rgb_to_yiq(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 3, H, W) YIQ."""
    return _apply(_RGB_TO_YIQ, image)


def yiq_to_rgb(image: torch.Tensor) -> torch.Tensor:
    return _apply(_YIQ_TO_RGB, image)


def luminance_image(image: torch.Tensor) -> torch.Tensor:
    """A grey RGB image whose three channels hold the luminance (R = G = B = Y)."""
    return rgb_to_yiq(image)[:, :1].expand(-1, 3, -1, -1).contiguous()


def matched_luminance(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The style as a grey luminance image with the content's luminance mean and standard deviation."""
    style_y = rgb_to_yiq(style)[:, :1]
    content_y = rgb_to_yiq(content)[:, :1]
    scale = content_y.std() / style_y.std().clamp(min=1e-8)
    matched = (style_y - style_y.mean()) * scale + content_y.mean()
    return matched.expand(-1, 3, -1, -1).contiguous()


def with_content_chroma(result: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The result's luminance with the content's chroma, back in RGB (not clipped)."""
    yiq = rgb_to_yiq(content.to(result.dtype))
    yiq[:, :1] = rgb_to_yiq(result)[:, :1]
    return yiq_to_rgb(yiq)


def matched_histogram(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The style's RGB colours mapped to the content's mean and covariance (not clipped: VGG takes
    any values, and clipping would undo the match)."""
    def stats(image):
        pixels = image.double().permute(1, 0, 2, 3).reshape(3, -1)
        mean = pixels.mean(dim=1, keepdim=True)
        centred = pixels - mean
        return pixels, mean, centred @ centred.T / pixels.shape[1]

    def sqrt_psd(matrix, inverse=False):
        values, vectors = torch.linalg.eigh(matrix)
        values = values.clamp(min=1e-10)
        power = -0.5 if inverse else 0.5
        return vectors @ torch.diag(values**power) @ vectors.T

    style_pixels, style_mean, style_cov = stats(style)
    _, content_mean, content_cov = stats(content)
    transform = sqrt_psd(content_cov) @ sqrt_psd(style_cov, inverse=True)
    mapped = transform @ (style_pixels - style_mean) + content_mean
    return mapped.reshape(3, style.shape[0], *style.shape[2:]).permute(1, 0, 2, 3).to(style.dtype).contiguous()


def prepare_inputs(mode: str, content: torch.Tensor, styles: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The content and styles the transfer actually runs on, for a colour-control mode."""
    if mode == "luminance":
        return luminance_image(content), [matched_luminance(style, content) for style in styles]
    if mode == "histogram":
        return content, [matched_histogram(style, content) for style in styles]
    return content, styles


def finish(mode: str, result: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The output image: for ``luminance`` the result's luminance in the content's colours."""
    if mode == "luminance":
        return with_content_chroma(result, content).clamp(0, 1)
    return result
