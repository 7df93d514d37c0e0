"""Shared fixtures: small images on disk, a private torch hub cache, a fast CPU config."""

from __future__ import annotations

import os

import torch

# Without CUDA the Triton kernels are tested through Triton's interpreter on the CPU.  Triton
# reads the variable when a kernel is defined, so it is set before fastnst imports any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the project's ``-n auto``: a worker per core) each worker takes one thread:
# workers with torch's default of one thread per core each would oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastnst import StyleConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def private_torch_home(tmp_path_factory, monkeypatch):
    """Every test sees an empty torch hub cache of its own: nothing is read from or written to
    the user's cache, and nothing is downloaded."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def content_path() -> Path:
    return EXAMPLES / "tubingen.jpg"


@pytest.fixture
def style_path() -> Path:
    return EXAMPLES / "starry_night.jpg"


@pytest.fixture
def second_style_path() -> Path:
    return EXAMPLES / "the_scream.jpg"


@pytest.fixture
def small_config() -> StyleConfig:
    """Random weights, 64 px, CPU: what every end-to-end test runs with."""
    return StyleConfig(weights="random", size=64, iterations=20, device="cpu", quiet=True)


def random_image(path: Path, size=(64, 48), seed=0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").convert(mode).save(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA; without it they are reported as skipped, never as passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
