"""Image I/O: every mode to RGB, EXIF orientation, limits, resizing, atomic saving."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastnst import files
from fastnst.errors import ImageError
from fastnst.images import (check_output_path, image_to_tensor, load_image, resized, save_image,
                            tensor_to_image)

from .conftest import random_image


def test_alpha_is_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))  # fully transparent
    rgba.putpixel((0, 0), (10, 20, 30, 255))  # one opaque pixel
    rgba.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (10, 20, 30)
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA", "RGBA", "YCbCr"])
def test_every_common_mode_becomes_rgb(tmp_path, mode):
    path = random_image(tmp_path / "x.png" if mode not in ("CMYK", "YCbCr") else tmp_path / "x.jpg",
                        mode=mode)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_palette_transparency_is_flattened():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    out = load_image(palette)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (200, 0, 0)


def test_sixteen_bit_grayscale_keeps_its_full_range(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # I;16 or I, whichever Pillow picks
    out = load_image(tmp_path / "deep.png")
    assert [out.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rotated.jpg")
    assert out.size == (20, 40)  # shown upright: portrait


def test_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "anim.gif").getpixel((4, 4)) == (255, 0, 0)


def test_unreadable_inputs_give_one_line_errors(tmp_path):
    (tmp_path / "text.jpg").write_text("not a picture\n")
    good = random_image(tmp_path / "good.jpg", size=(200, 150))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = {tmp_path / "absent.png": "no such file", tmp_path / "text.jpg": "not an image",
             tmp_path / "cut.jpg": "truncated or corrupt", tmp_path: "is a folder"}
    for path, message in cases.items():
        with pytest.raises(ImageError, match=message) as error:
            load_image(path)
        assert "\n" not in str(error.value)


def test_decompression_bomb_limit_is_kept(tmp_path, monkeypatch):
    path = random_image(tmp_path / "big.png", size=(64, 48))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 px is over 2x: Pillow refuses
    with pytest.raises(ImageError, match="decompression-bomb limit of 1000"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # between 1x and 2x: Pillow only warns
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(path)


def test_resize_to_longest_side():
    image = Image.new("RGB", (300, 200))
    assert resized(image, 60).size == (60, 40)
    assert resized(image, 600).size == (600, 400)
    assert resized(Image.new("RGB", (10, 1000)), 100).size == (1, 100)


def test_tensor_round_trip_and_clipping():
    image = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 4, 5) and tensor.dtype == torch.float32
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), np.asarray(image))
    clipped = tensor_to_image(torch.tensor([-1.0, 0.5, 2.0]).view(3, 1, 1))
    assert clipped.getpixel((0, 0)) == (0, 128, 255)
    with pytest.raises(ImageError, match="shape"):
        tensor_to_image(torch.zeros(4, 2, 2))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"])
def test_save_by_extension_atomically(tmp_path, suffix):
    image = Image.new("RGB", (6, 4), (200, 100, 50))
    path = save_image(image, tmp_path / f"out{suffix}")
    assert Image.open(path).size == (6, 4)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    def broken_save(self, fp, format=None, **kwargs):
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageError, match="No space left on device"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "out.png")
    assert os.listdir(tmp_path) == []


def test_output_path_checks(tmp_path):
    assert check_output_path(tmp_path / "fine.png") == tmp_path / "fine.png"
    (tmp_path / "file").write_text("")
    cases = {tmp_path / "out.bmpx": "unknown output extension '.bmpx'",
             tmp_path / "noext": "unknown output extension",
             tmp_path / "missing" / "out.png": "does not exist",
             tmp_path / "file" / "out.png": "does not exist",
             }
    for path, message in cases.items():
        with pytest.raises(ImageError, match=message):
            check_output_path(path)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="is a folder"):
        check_output_path(tmp_path / "dir.png")
    assert sorted(os.listdir(tmp_path)) == ["dir.png", "file"]  # the write probe cleaned up


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ImageError, match="cannot write to output folder"):
            check_output_path(folder / "out.png")
    finally:
        folder.chmod(0o755)


def test_unwritable_folder_is_refused_even_for_root(tmp_path, monkeypatch):
    """Simulates what a read-only mount does to the write probe (root ignores permission bits)."""
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(ImageError, match="cannot write to output folder .*Read-only file system"):
        check_output_path(tmp_path / "out.png")


def test_resample_chooses_the_filter_that_scales_inputs(content_path, style_path, small_config):
    """--resample bilinear scales content and styles as neural-style-pt does (PIL's bilinear);
    lanczos stays the default, and the choice reaches the objective (the loss at iteration 1)."""
    from fastnst import render
    from fastnst.images import resized

    photo = load_image(content_path)
    assert resized(photo, 40, "bilinear").tobytes() == photo.resize(resized(photo, 40).size,
                                                                     Image.Resampling.BILINEAR).tobytes()
    assert resized(photo, 40).tobytes() == photo.resize(resized(photo, 40).size, Image.Resampling.LANCZOS).tobytes()
    losses = {name: render(content_path, style_path, small_config, iterations=1, resample=name).losses[0][1]
              for name in ("lanczos", "bilinear")}
    assert losses["lanczos"] != losses["bilinear"]


def test_a_recipe_from_before_an_option_existed_counts_it_at_its_default():
    """Recipes written before --resample lack it: rendered with Lanczos, the default, so a rerun
    with the default is the same work and one with bilinear is not."""
    from fastnst import StyleConfig
    from fastnst.recipe import first_difference, pixel_options

    new = {"options": pixel_options(StyleConfig())}
    old = {"options": {k: v for k, v in new["options"].items() if k != "resample"}}
    assert first_difference(old, new) is None
    bilinear = {"options": pixel_options(StyleConfig(resample="bilinear"))}
    assert first_difference(old, bilinear) == "--resample lanczos there, bilinear here"
