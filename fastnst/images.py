"""Image I/O with Pillow: decode, EXIF orientation, mode -> RGB, resizing, atomic saving.

Tensors are (1, 3, H, W) float32 RGB in [0, 1].  Every failure is an ImageError with one line
of text; nothing here leaves a partial file behind.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features

from .errors import ImageError
from .files import atomic_write, check_writable

# Output formats by file extension (Pillow format name).
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
                ".tiff": "TIFF"}
_SAVE_OPTIONS = {"JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"quality": 95}}

def load_image(source) -> Image.Image:
    """An RGB Pillow image from a path, a Pillow image or a (3, H, W)/(1, 3, H, W) tensor in [0, 1]."""
    if isinstance(source, torch.Tensor):
        return tensor_to_image(source)
    if isinstance(source, Image.Image):
        return to_rgb(_upright(source))
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"cannot use a {type(source).__name__} as an image (give a path, PIL image or tensor)")
    return to_rgb(_upright(_read(Path(source))))


def _read(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"'{path}': no such file")
    if path.is_dir():
        raise ImageError(f"'{path}' is a folder, not an image")
    try:
        # Pillow warns between 1x and 2x its pixel limit and raises above; both are refused so
        # that a hostile file cannot make us allocate gigabytes.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()  # decode now: truncated data fails here, not halfway through a run
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"'{path}' has more pixels than Pillow's decompression-bomb limit of "
                         f"{Image.MAX_IMAGE_PIXELS} (refused as a safety measure)") from None
    except UnidentifiedImageError:
        raise ImageError(f"'{path}' is not an image Pillow can read") from None
    except PermissionError:
        raise ImageError(f"'{path}': permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"'{path}' is truncated or corrupt ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so photos come out the way cameras and viewers show them."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block should not reject an otherwise good image
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _deep_gray_to_l(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _deep_gray_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit grayscale to 8-bit, scaling the full range (Pillow's convert would clip)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0  # 16-bit samples, whichever container Pillow chose
    values = np.clip(np.nan_to_num(values * scale), 0, 255)
    return Image.fromarray(np.round(values).astype(np.uint8), mode="L")


def resized(image: Image.Image, longest_side: int) -> Image.Image:
    """Scale so the longest side is ``longest_side`` (up or down), keeping the aspect ratio."""
    width, height = image.size
    scale = longest_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    # copy(): Pillow's buffer is read-only; contiguous(): plain NCHW memory, not HWC seen through permute.
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0).contiguous()


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) values in [0, 1] to an RGB image; out-of-range values are clipped."""
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ImageError(f"an image tensor must have shape (3, H, W) or (1, 3, H, W), not {tuple(tensor.shape)}")
    pixels = tensor.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def output_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SAVE_FORMATS:
        raise ImageError(f"unknown output extension '{suffix or Path(path).name}' "
                         f"(use {', '.join(sorted(set(SAVE_FORMATS)))})")
    fmt = SAVE_FORMATS[suffix]
    if fmt == "WEBP" and not features.check("webp"):
        raise ImageError("this Pillow was built without WebP support; save as .png instead")
    return fmt


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail before any work if ``path`` cannot be written: bad extension, missing or read-only folder."""
    output_format(path)
    return check_writable(path)


def save_image(image, path: str | os.PathLike) -> Path:
    """Save atomically, in the format of the extension (see files.atomic_write)."""
    fmt = output_format(path)
    if isinstance(image, torch.Tensor):
        image = tensor_to_image(image)
    return atomic_write(path, lambda stream: image.save(stream, format=fmt, **_SAVE_OPTIONS.get(fmt, {})))
