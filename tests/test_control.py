"""Artistic control: colour preservation, spatial masks, presets, 16-bit output, metadata, loss log."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from fastnst import StyleConfig, color, render
from fastnst.cli import build_parser, main
from fastnst.config import PRESETS
from fastnst.images import image_to_tensor, load_image, resized
from fastnst.objective import feature_layers
from fastnst.run import initial_image
from fastnst.vgg import VGGFeatures, random_state_dict


def _content(path, size=64):
    return image_to_tensor(resized(load_image(path), size))


def test_luminance_keeps_the_content_colours(content_path, style_path, small_config):
    result = render(content_path, style_path, small_config, preserve_color="luminance")
    content = _content(content_path)
    ours, theirs = color.rgb_to_yiq(result.image), color.rgb_to_yiq(content)
    unclipped = ((result.image > 0) & (result.image < 1)).all(dim=1, keepdim=True)
    assert unclipped.float().mean() > 0.95  # clipping into [0, 1] is the only thing that can alter chroma
    assert ((ours[:, 1:] - theirs[:, 1:]).abs() * unclipped).max() < 1e-5
    assert (ours[:, :1] - theirs[:, :1]).abs().mean() > 0.01  # the luminance was stylised


def test_luminance_inputs():
    g = torch.Generator().manual_seed(0)
    content, style = torch.rand(1, 3, 20, 30, generator=g), torch.rand(1, 3, 16, 16, generator=g) * 0.3
    grey, (matched,) = color.prepare_inputs("luminance", content, [style])
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    content_y = color.rgb_to_yiq(content)[:, 0]
    assert matched[:, 0].mean().item() == pytest.approx(content_y.mean().item(), abs=1e-5)
    assert matched[:, 0].std().item() == pytest.approx(content_y.std().item(), rel=1e-4)
    rgb = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(color.yiq_to_rgb(color.rgb_to_yiq(rgb)), rgb)


def test_histogram_matching_gives_the_content_mean_and_covariance(content_path, style_path):
    content, style = _content(content_path, 128), _content(style_path, 96)
    matched = color.matched_histogram(style, content)

    def stats(image):
        pixels = image.double().permute(1, 0, 2, 3).reshape(3, -1)
        return pixels.mean(dim=1), torch.cov(pixels, correction=0)

    (mean, cov), (target_mean, target_cov) = stats(matched), stats(content)
    assert (mean - target_mean).abs().max() < 1e-3 and (cov - target_cov).abs().max() < 1e-3
    assert matched.shape == style.shape


def test_histogram_mode_runs(content_path, style_path, small_config):
    result = render(content_path, style_path, small_config, preserve_color="histogram", iterations=3)
    assert result.image.shape == (1, 3, 48, 64)


def _mask(path: Path, left_white: bool, width=64, height=48) -> Path:
    pixels = np.zeros((height, width), dtype=np.uint8)
    if left_white is None:
        pixels[:] = 255
    elif left_white:
        pixels[:, : width // 2] = 255
    else:
        pixels[:, width // 2:] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_all_white_masks_give_the_unmasked_run(content_path, style_path, small_config, tmp_path):
    white = _mask(tmp_path / "white.png", None)
    plain = render(content_path, style_path, small_config, iterations=5)
    masked = render(content_path, style_path, small_config, iterations=5, content_mask=[str(white)],
                    style_mask=[str(white)])
    torch.testing.assert_close(masked.image, plain.image, rtol=0, atol=1e-6)
    assert [loss for _, loss in masked.losses] == pytest.approx([loss for _, loss in plain.losses], rel=1e-6)


def test_each_half_moves_toward_its_own_style(content_path, style_path, second_style_path, small_config, tmp_path):
    left, right = _mask(tmp_path / "left.png", True), _mask(tmp_path / "right.png", False)
    config = small_config.replace(iterations=30, content_weight=0.0, init="noise")
    result = render(content_path, [style_path, second_style_path], config, content_mask=[str(left), str(right)])
    network = VGGFeatures(feature_layers(config), random_state_dict(0))
    layer = network.layers.index("conv2_1")

    def gram(image, mask=None):
        with torch.no_grad():
            f = network(image)[layer]
        if mask is not None:
            f = f[:, :, :, : f.shape[-1] // 2] if mask == "left" else f[:, :, :, f.shape[-1] // 2:]
        f = f.flatten(2)[0]
        return f @ f.T / f.shape[1]  # per position, comparable across sizes

    styles = [gram(_content(style_path)), gram(_content(second_style_path))]
    start = initial_image("noise", _content(content_path), _content(style_path), config.seed)
    for half, own, other in (("left", 0, 1), ("right", 1, 0)):
        before, after = gram(start, half), gram(result.image, half)
        moved_own = (before - styles[own]).norm() - (after - styles[own]).norm()
        moved_other = (before - styles[other]).norm() - (after - styles[other]).norm()
        assert moved_own > moved_other, (half, moved_own, moved_other)


def test_masks_are_checked(content_path, style_path, small_config, tmp_path):
    white = _mask(tmp_path / "white.png", None)
    with pytest.raises(Exception, match="content_mask needs one value per style image"):  # the API names its argument
        render(content_path, style_path, small_config, content_mask=[str(white), str(white)])
    with pytest.raises(Exception, match="cannot be combined with tile"):
        render(content_path, style_path, small_config, content_mask=[str(white)], tile=32)


def test_gatys2016_preset_is_the_paper():
    config = StyleConfig(preset="gatys2016")
    assert config.content_layers == ("conv4_2",)
    assert config.style_layers == ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
    assert config.style_layer_weights == (0.2,) * 5 and config.content_layer_weights == (1.0,)
    assert config.pooling == "avg" and config.init == "noise" and config.optimizer == "lbfgs"
    assert config.content_weight / config.style_weight == pytest.approx(1e-3)
    # Explicit options win over the preset, whichever way the config is made.
    assert StyleConfig().replace(preset="gatys2016", pooling="max").pooling == "max"
    assert StyleConfig().replace(preset="fast", init="noise").init == "noise"
    assert StyleConfig(preset="gatys2016").replace(iterations=7).pooling == "avg"


def test_presets_in_the_cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    help_text = build_parser()._subparsers._group_actions[0].choices["stylize"].format_help()
    for name in PRESETS:
        assert name in help_text
    from fastnst.cli import config_from_args

    args = build_parser().parse_args(["stylize", "c", "s", "-o", "o.png", "--preset", "gatys2016", "--pooling", "max"])
    config = config_from_args(StyleConfig, args)
    assert config.pooling == "max" and config.content_weight == 1e-3


def _png16(path: Path) -> np.ndarray:
    """Decode our 16-bit PNG by hand (Pillow reads 16-bit RGB PNGs as 8-bit)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (16, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * 6)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].copy().view(">u2").reshape(height, width, 3)


def test_16bit_png_and_tiff(content_path, style_path, tmp_path):
    args = ["stylize", str(content_path), str(style_path), "--weights", "random", "--size", "32", "--iterations",
            "2", "--device", "cpu", "--quiet", "--output-16bit"]
    assert main([*args, "-o", str(tmp_path / "out.png")]) == 0
    assert main([*args, "-o", str(tmp_path / "out.tif")]) == 0
    png = _png16(tmp_path / "out.png")
    assert png.shape == (24, 32, 3) and png.dtype.itemsize == 2
    assert len(np.unique(png % 257)) > 1  # real 16-bit values, not 8-bit ones scaled up
    with Image.open(tmp_path / "out.tif") as tiff:
        assert tiff.size == (32, 24) and tiff.tag_v2[258] == (16, 16, 16)
        offset, count = tiff.tag_v2[273][0], tiff.tag_v2[279][0]
    raw = np.frombuffer((tmp_path / "out.tif").read_bytes()[offset:offset + count], dtype="<u2").reshape(24, 32, 3)
    assert np.abs(raw.astype(int) - png.astype(int)).max() == 0  # same render, same 16-bit pixels
    assert main([*args, "-o", str(tmp_path / "out.jpg")]) == 2  # no 16-bit JPEG


def test_icc_profile_and_exif_orientation_are_kept(style_path, tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    exif[0x010F] = "fastnst test camera"
    Image.new("RGB", (64, 32), (120, 30, 200)).save(tmp_path / "photo.jpg", icc_profile=profile, exif=exif)
    for name in ("out.png", "out.jpg"):
        assert main(["stylize", str(tmp_path / "photo.jpg"), str(style_path), "-o", str(tmp_path / name),
                     "--weights", "random", "--size", "64", "--iterations", "2", "--device", "cpu", "--quiet"]) == 0
        with Image.open(tmp_path / name) as out:
            assert out.size == (32, 64)  # stored upright, portrait as the camera meant
            assert out.info.get("icc_profile") == profile
            kept = out.getexif()
            assert kept.get(0x0112, 1) == 1 and kept.get(0x010F) == "fastnst test camera"


def test_loss_log(content_path, style_path, small_config, tmp_path):
    log = tmp_path / "loss.jsonl"
    result = render(content_path, style_path, small_config, iterations=4, scales=(32, 64),
                    scale_iterations=(2, 2), log=str(log))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4] and [r["size"] for r in lines] == [32, 32, 64, 64]
    assert [r["loss"] for r in lines] == [loss for _, loss in result.losses]
    assert all(r["seconds"] >= 0 for r in lines)
