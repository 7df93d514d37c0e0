"""The Python API: paths, PIL images and tensors in, a PIL image out; typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastnst
from fastnst.cli import main
from fastnst.errors import ConfigError, FastNSTError, ImageError


def test_stylize_accepts_paths_pil_images_and_tensors(content_path, style_path, small_config):
    config = small_config.replace(iterations=3)
    from_paths = fastnst.stylize(content_path, style_path, config)
    assert isinstance(from_paths, Image.Image) and from_paths.size == (64, 48)
    content = Image.open(content_path)
    style_tensor = fastnst.images.image_to_tensor(fastnst.load_image(style_path))
    mixed = fastnst.stylize(content, [style_tensor[0]], config)
    assert mixed.size == (64, 48)
    # The same pixels by another route give the same picture.
    assert np.array_equal(np.asarray(mixed), np.asarray(from_paths))


def test_overrides_and_defaults(content_path, style_path):
    result = fastnst.render(content_path, style_path, weights="random", size=32, iterations=2,
                            device="cpu", quiet=True, content_layers=["conv2_2"],
                            style_layers=["conv1_1", "conv2_1"])
    assert result.image.shape == (1, 3, 24, 32) and result.iterations == 2
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        fastnst.stylize(content_path, style_path, colour="red")


def test_errors_are_typed(content_path, style_path, tmp_path):
    with pytest.raises(ImageError):
        fastnst.stylize(tmp_path / "missing.png", style_path, weights="random")
    with pytest.raises(ConfigError):
        fastnst.stylize(content_path, style_path, iterations=0)
    with pytest.raises(ConfigError, match="at least one style image"):
        fastnst.stylize(content_path, [], weights="random")
    with pytest.raises(FastNSTError):
        fastnst.stylize(content_path, torch.zeros(2, 2), weights="random", size=32)


def test_api_errors_name_the_api_s_arguments_and_the_cli_its_flags(content_path, style_path, private_torch_home,
                                                                 capsys, tmp_path):
    """The library's messages said `use --weights PATH|random` to Python callers too; the API now
    names its own arguments and the CLI keeps its flags."""
    from torchvision.models import VGG19_Weights

    from fastnst.config import in_api_terms
    from fastnst.errors import WeightsError
    from fastnst.vgg import hub_cache_path

    with pytest.raises(ConfigError) as caught:
        fastnst.stylize(content_path, style_path, size=1, weights="random", device="cpu")
    assert "--" not in str(caught.value) and "size" in str(caught.value)
    cache = hub_cache_path(VGG19_Weights.IMAGENET1K_V1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"use weights=PATH\|random"):
        fastnst.stylize(content_path, style_path, size=32, device="cpu", quiet=True)
    assert main(["stylize", str(content_path), str(style_path), "-o", str(tmp_path / "o.png"), "--size", "32",
                 "--device", "cpu", "--quiet"]) == 2
    assert "use --weights PATH|random" in capsys.readouterr().err
    assert in_api_terms("--no-cuda-graph with --tile SIZE, and --lr") == "cuda_graph=False with tile=SIZE, and lr"
    assert in_api_terms("see 'fastnst --help'") == "see 'fastnst --help'"  # not an option: kept
    assert in_api_terms("use --optimizer adam, or a smaller --size") == "use optimizer='adam', or a smaller size"
