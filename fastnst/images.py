"""Image I/O with Pillow: decode, EXIF orientation, mode -> RGB, resizing, atomic saving.

Tensors are (1, 3, H, W) float32 RGB in [0, 1].  Every failure is an ImageError with one line
of text; nothing here leaves a partial file behind.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features

from .errors import ImageError, first_line
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


def displayed_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header alone; the
    ImageError load_image gives for what cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
            return width, height
    except Exception:
        load_image(path)  # raises the one-line ImageError a render would give
        raise ImageError(f"'{path}' cannot be read") from None


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
        raise ImageError(f"'{path}' is truncated or corrupt ({first_line(exc)})") from None


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


def fitted_size(size: tuple[int, int], longest_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is ``longest_side``, keeping the aspect ratio."""
    width, height = size
    scale = longest_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}


def resized(image: Image.Image, longest_side: int, resample: str = "lanczos") -> Image.Image:
    """Scale so the longest side is ``longest_side`` (up or down), keeping the aspect ratio, with
    the filter ``resample`` names (--resample: lanczos, or bilinear as neural-style-pt)."""
    size = fitted_size(image.size, longest_side)
    if size == image.size:
        return image
    return image.resize(size, RESAMPLING[resample])


def resized_style(image: Image.Image, size: int, style_scale: float, resample: str = "lanczos") -> Image.Image:
    """A style image for an output whose longest side is ``size``: its own longest side is
    ``style_scale`` times that (--style-scale), scaled with ``resample``."""
    return resized(image, max(1, round(size * style_scale)), resample)


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


def check_output_path(path: str | os.PathLike, bits: int = 8) -> Path:
    """Fail before any work if ``path`` cannot be written: bad extension, missing or read-only folder,
    16 bits asked of a format that has no 16-bit colour."""
    fmt = output_format(path)
    if bits == 16 and fmt not in SIXTEEN_BIT_FORMATS:
        raise ImageError(f"16-bit output needs a .png or .tif/.tiff file, not '{Path(path).suffix}'")
    return check_writable(path)


@dataclass
class Metadata:
    """What an output keeps of its content image: the colour profile and the EXIF block."""

    icc_profile: bytes | None = None
    exif: bytes | None = None


def read_metadata(source) -> Metadata:
    """The content's ICC profile (only an RGB one: other spaces no longer describe the converted
    pixels) and its EXIF block with the orientation set to 1, since pixels are stored upright."""
    if not isinstance(source, (str, os.PathLike)):
        return Metadata()
    try:
        with Image.open(source) as image:
            icc = image.info.get("icc_profile")
            if icc and icc[16:20] != b"RGB ":
                icc = None  # a CMYK or grey profile would mislabel RGB output
            exif = image.getexif()
            if 0x0112 in exif:
                exif[0x0112] = 1
            return Metadata(icc_profile=icc or None, exif=exif.tobytes() if len(exif) else None)
    except Exception:  # metadata is a courtesy; the pixels were read (or rejected) elsewhere
        return Metadata()


def save_image(image, path: str | os.PathLike, bits: int = 8, metadata: Metadata | None = None) -> Path:
    """Save atomically, in the format of the extension (see files.atomic_write); ``bits`` 16 writes
    16-bit PNG or TIFF from a tensor; ``metadata`` carries the content's profile and EXIF."""
    fmt = output_format(path)
    metadata = metadata or Metadata()
    if bits == 16:
        if fmt not in SIXTEEN_BIT_FORMATS or not isinstance(image, torch.Tensor):
            raise ImageError("16-bit output needs a .png or .tif/.tiff file and a tensor image")
        pixels = _sixteen_bit(image)
        writer = _write_png16 if fmt == "PNG" else _write_tiff16
        return atomic_write(path, lambda stream: writer(stream, pixels, metadata.icc_profile))
    if isinstance(image, torch.Tensor):
        image = tensor_to_image(image)
    options = dict(_SAVE_OPTIONS.get(fmt, {}))
    if metadata.icc_profile:
        options["icc_profile"] = metadata.icc_profile
    if metadata.exif and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        options["exif"] = metadata.exif
    return atomic_write(path, lambda stream: image.save(stream, format=fmt, **options))


SIXTEEN_BIT_FORMATS = ("PNG", "TIFF")


def _sixteen_bit(tensor: torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint16 from a (3, H, W) or (1, 3, H, W) tensor in [0, 1]."""
    if tensor.dim() == 4:
        tensor = tensor[0]
    scaled = tensor.detach().float().cpu().nan_to_num(0.0).clamp(0, 1).mul(65535).round()
    return scaled.permute(1, 2, 0).numpy().astype(np.uint16)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png16(stream, pixels: np.ndarray, icc: bytes | None) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one): IHDR, optional iCCP, IDAT of unfiltered rows."""
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8),
                           pixels.astype(">u2").reshape(height, -1).view(np.uint8)], axis=1)
    stream.write(b"\x89PNG\r\n\x1a\n")
    stream.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)))
    if icc:
        stream.write(_png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(icc)))
    stream.write(_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)))
    stream.write(_png_chunk(b"IEND", b""))


def _write_tiff16(stream, pixels: np.ndarray, icc: bytes | None) -> None:
    """A baseline little-endian TIFF, RGB, 16 bits per sample, one uncompressed strip."""
    height, width, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    entries = 11 + (1 if icc else 0)
    ifd_size = 2 + entries * 12 + 4
    bits_offset = 8 + ifd_size
    data_offset = bits_offset + 6
    icc_offset = data_offset + len(data)
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bits_offset), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, data_offset), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, len(data)),
            (284, 3, 1, 1), (296, 3, 1, 1)]
    if icc:
        tags.append((34675, 7, len(icc), icc_offset))
    header = b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    for tag, kind, count, value in sorted(tags):
        # A single SHORT sits left-justified in the 4-byte value field; everything else is a LONG.
        packed = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        header += struct.pack("<HHI", tag, kind, count) + packed
    stream.write(header + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data + (icc or b""))
