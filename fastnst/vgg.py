"""VGG19 feature extractor: layer names, weights (imagenet | file | random) in three formats,
truncation, pooling.

The network is torchvision's ``vgg19``; only its ``features`` part is kept, cut after the deepest
layer asked for, with every parameter frozen (style transfer never needs a weight gradient).
A layer's feature is its rectified response, as in Gatys et al.: ``conv4_2`` and ``relu4_2``
name the same tensor, the output of the ReLU that follows that convolution.

Weights come in three formats, which differ in what input the network expects:

- ``torchvision``: torchvision's ImageNet VGG19 (trained in PyTorch): RGB in [0, 1], normalised
  by the ImageNet mean and standard deviation.
- ``caffe``: Simonyan & Zisserman's original Caffe VGG19, converted to PyTorch for neural-style
  (``vgg19-d01eb7cb.pth``, torchvision's key layout): BGR on a 0-255 scale minus the ImageNet mean
  pixel (103.939, 116.779, 123.68).
- ``caffe-normalised``: the same network with each filter rescaled so that its mean activation
  over ImageNet is one, the one Gatys et al. used (``vgg_conv.pth``, keys ``conv1_1.weight`` ...
  ``conv5_4.bias``), with the same Caffe preprocessing.

Every format is run on the RGB image in [0, 1]: a BGR network gets its first convolution's
input channels reversed when it is loaded, so the channel swap costs nothing per step.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import VGG19_Weights, vgg19

from .errors import WeightsError, first_line

# Channels of VGG19's 16 convolutions, block by block (Simonyan & Zisserman, configuration E).
_BLOCKS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))

# ImageNet statistics the torchvision weights were trained with (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Caffe models' mean pixel (BGR, 0-255 scale), as published with VGG19 and used by neural-style.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

FORMATS = ("torchvision", "caffe", "caffe-normalised")


@dataclass(frozen=True)
class Preprocessing:
    """What a format's network expects, as an affine map of the RGB image in [0, 1]:
    (image - mean) / std per RGB channel, and whether its first layer reads BGR."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool


_CAFFE = Preprocessing(mean=tuple(value / 255 for value in reversed(CAFFE_MEAN_BGR)),  # type: ignore[arg-type]
                       std=(1 / 255,) * 3, bgr=True)
PREPROCESSING = {
    "torchvision": Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr=False),
    "caffe": _CAFFE,
    "caffe-normalised": _CAFFE,
}

# Published file names auto-detection trusts when the key layout cannot tell (torchvision's layout
# is shared by torchvision's own weights and the Caffe conversion).
PUBLISHED_FILES = {
    "vgg19-dcbb9e9d.pth": "torchvision",  # torchvision's ImageNet weights
    "vgg19-d01eb7cb.pth": "caffe",  # the Caffe VGG19 converted for neural-style / neural-style-pt
    "vgg_conv.pth": "caffe-normalised",  # Gatys et al.'s normalised VGG19 (PytorchNeuralStyleTransfer)
}


def _layer_table() -> dict[str, tuple[int, int, int]]:
    """Map ``convB_I`` / ``reluB_I`` to (index of the ReLU in ``features``, channels, pools before)."""
    table: dict[str, tuple[int, int, int]] = {}
    index = 0
    for block, channels in enumerate(_BLOCKS, start=1):
        for position, width in enumerate(channels, start=1):
            relu_index = index + 1  # conv at `index`, its ReLU right after
            table[f"conv{block}_{position}"] = (relu_index, width, block - 1)
            table[f"relu{block}_{position}"] = (relu_index, width, block - 1)
            index += 2
        index += 1  # the pooling layer closing the block
    return table


LAYERS = _layer_table()
LAYER_NAMES = tuple(name for name in LAYERS if name.startswith("conv"))


def layer_info(name: str) -> tuple[int, int, int]:
    """(features index, channels, poolings before it) of a layer name; ValueError if unknown."""
    try:
        return LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown VGG19 layer '{name}' (use conv1_1 .. conv5_4 or relu1_1 .. relu5_4)") from None


def layer_channels(name: str) -> int:
    return layer_info(name)[1]


def layer_stride(name: str) -> int:
    """How many input pixels one feature position spans along each axis (2 ** poolings before it)."""
    return 2 ** layer_info(name)[2]


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of torchvision's vgg19 ``features`` (without the prefix)."""
    shapes: dict[str, tuple[int, ...]] = {}
    index, in_channels = 0, 3
    for channels in _BLOCKS:
        for width in channels:
            shapes[f"{index}.weight"] = (width, in_channels, 3, 3)
            shapes[f"{index}.bias"] = (width,)
            in_channels = width
            index += 2
        index += 1
    return shapes


FEATURE_SHAPES = _expected_shapes()


def hub_cache_path(weights) -> Path:
    """Where torch hub keeps (or will keep) a torchvision weights enum member's checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def imagenet_cache_path() -> Path:
    """Where torch hub keeps (or will keep) torchvision's VGG19 ImageNet checkpoint."""
    return hub_cache_path(VGG19_Weights.IMAGENET1K_V1)


def hub_state_dict(weights, what: str, instead: str, progress: bool = False) -> Mapping[str, torch.Tensor]:
    """A torchvision weights enum member's state dict, downloaded once into the torch hub cache and
    checked against the hash in its file name; offline or corrupt, a WeightsError naming the cache
    path and ``instead`` (what the user can do otherwise)."""
    cache = hub_cache_path(weights)
    try:
        return weights.get_state_dict(progress=progress, check_hash=True, weights_only=True, map_location="cpu")
    except (URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(f"cannot download {what} ({reason}); put {cache.name} at {cache} or use {instead}") from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"{what} at {cache} are unusable ({first_line(exc)}); delete the file to download it "
                           f"again, or use {instead}") from None


def _load_imagenet(progress: bool) -> Mapping[str, torch.Tensor]:
    return hub_state_dict(VGG19_Weights.IMAGENET1K_V1, "the VGG19 ImageNet weights", "--weights PATH|random",
                          progress)


def _load_file(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist (use imagenet, random or a file path)")
    try:
        # weights_only: a checkpoint can carry pickled code; never run it.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"weights file '{path}' holds more than tensors and was refused ({first_line(exc)})"
        ) from None
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        raise WeightsError(f"weights file '{path}' is not a PyTorch checkpoint ({first_line(exc)})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"weights file '{path}' does not hold a state dict (found {type(state).__name__})")
    return state


_NAMED_KEY = re.compile(r"conv(\d)_(\d)\.(weight|bias)")
_INDEX_NAMES = {f"{LAYERS[name][0] - 1}.{kind}": f"{name}.{kind}"  # "12.bias" -> "conv3_2.bias"
                for name in LAYER_NAMES for kind in ("weight", "bias")}


def is_named_layout(state: Mapping[str, object]) -> bool:
    """Keys ``conv1_1.weight`` ... (the normalised VGG19's layout) rather than torchvision's ``N.weight``."""
    return any(_NAMED_KEY.fullmatch(str(key)) for key in state)


def _from_named_layout(state: Mapping[str, object]) -> dict[str, object]:
    """``convB_I.weight`` -> ``N.weight`` (N the convolution's index in torchvision's ``features``);
    other keys (fully connected layers) are dropped, unknown conv names kept to be refused."""
    indexed: dict[str, object] = {}
    for key, value in state.items():
        match = _NAMED_KEY.fullmatch(str(key))
        if match is None:
            continue
        block, position, kind = match.groups()
        name = f"conv{block}_{position}"
        indexed[f"{LAYERS[name][0] - 1}.{kind}" if name in LAYERS else str(key)] = value
    return indexed


def features_state_dict(state: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    """Pick and validate the ``features`` weights of a VGG19 state dict.

    Accepts torchvision's full vgg19 state dict (``features.N.*``; the classifier is ignored), a
    state dict of ``features`` alone (``N.*``), or the named layout ``conv1_1.weight`` ...
    ``conv5_4.bias`` (the normalised VGG19's).  Raises WeightsError naming the first problem.
    """
    named = is_named_layout(state)
    if named:
        state = _from_named_layout(state)
    prefixed = any(str(key).startswith("features.") for key in state)

    def shown(key: str) -> str:
        """A key as the file names it."""
        if named:
            return _INDEX_NAMES.get(key, key)
        return f"features.{key}" if prefixed else key

    picked: dict[str, object] = {}
    for key, value in state.items():
        key = str(key)
        if prefixed:
            if not key.startswith("features."):
                continue  # classifier weights: not used for style transfer
            key = key[len("features."):]
        picked[key] = value
    for key, shape in FEATURE_SHAPES.items():
        if key not in picked:
            raise WeightsError(f"{source}: missing key '{shown(key)}' (not a VGG19 checkpoint?)")
        value, label = picked[key], shown(key) if named else key
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{source}: '{label}' is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise WeightsError(
                f"{source}: '{label}' has shape {tuple(value.shape)}, VGG19 needs {shape}"
            )
    for key in picked:
        if key not in FEATURE_SHAPES:
            raise WeightsError(f"{source}: unexpected key '{shown(key)}' (not a VGG19 checkpoint?)")
    return {key: picked[key].float() for key in FEATURE_SHAPES}  # type: ignore[union-attr]


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Seeded He-normal weights (fan-in), zero biases: activations keep their scale through depth."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in FEATURE_SHAPES.items():
        if key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.zeros(shape)
    return state


def load_weights(spec: str, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """The ``features`` state dict (torchvision's index layout) for ``imagenet``, ``random`` or a file path."""
    return load_network_weights(spec, "auto", seed, progress).state


@dataclass(frozen=True)
class Weights:
    """A network's weights in torchvision's index layout, their format and why it was chosen."""

    state: dict[str, torch.Tensor]
    format: str
    reason: str


def load_network_weights(spec: str, weights_format: str = "auto", seed: int = 0,
                         progress: bool = True) -> Weights:
    """The weights for ``imagenet``, ``random`` or a file path, and their format: as given, or for
    ``auto`` recognised by the key layout and, for torchvision's layout, the published file name."""
    if weights_format != "auto" and weights_format not in FORMATS:
        raise WeightsError(f"unknown weights format '{weights_format}' (use auto, {', '.join(FORMATS)})")
    if spec == "random":
        state = random_state_dict(seed)
        chosen = weights_format if weights_format != "auto" else "torchvision"
        return Weights(state, chosen, "random weights" if weights_format == "auto" else "as given")
    if spec == "imagenet":
        raw = _load_imagenet(progress)
        source = f"ImageNet weights at {imagenet_cache_path()}"
        found, reason = "torchvision", "torchvision's ImageNet weights"
    else:
        raw = _load_file(spec)
        source = f"weights file '{spec}'"
        found, reason = _recognise(Path(spec).name, raw)
    state = features_state_dict(raw, source)
    if weights_format != "auto":
        return Weights(state, weights_format, "as given")
    return Weights(state, found, reason)


def _recognise(filename: str, state: Mapping[str, object]) -> tuple[str, str]:
    """(format, reason) of a weights file for ``--weights-format auto``."""
    if is_named_layout(state):
        return "caffe-normalised", "keys conv1_1.weight ...: the normalised VGG19's layout (vgg_conv.pth)"
    if filename in PUBLISHED_FILES:
        return PUBLISHED_FILES[filename], f"the published file name {filename}"
    return "torchvision", ("torchvision's key layout; a Caffe conversion under another file name needs "
                           "--weights-format caffe")


class VGGFeatures(nn.Module):
    """Runs VGG19 on an RGB image in [0, 1] and returns the requested layers' features, in order;
    ``weights_format`` says what input the weights expect (module docstring)."""

    def __init__(self, layers: Sequence[str], state_dict: Mapping[str, torch.Tensor], pooling: str = "max",
                 channels_last: bool = True, weights_format: str = "torchvision"):
        super().__init__()
        if not layers:
            raise ValueError("at least one layer is needed")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', not '{pooling}'")
        if weights_format not in PREPROCESSING:
            raise ValueError(f"weights_format must be one of {', '.join(FORMATS)}, not '{weights_format}'")
        self.weights_format = weights_format
        preprocessing = PREPROCESSING[weights_format]
        if preprocessing.bgr:  # the first convolution reads BGR: reverse its input channels once
            state_dict = {**state_dict, "0.weight": state_dict["0.weight"].flip(1)}
        self.layers = tuple(layers)
        self.indices = tuple(layer_info(name)[0] for name in self.layers)
        last = max(self.indices)
        # Built on the meta device: torchvision's constructor would otherwise spend a second
        # initialising the 120M classifier parameters we throw away.
        with torch.device("meta"):
            features = vgg19(weights=None).features[: last + 1]
        for i, module in enumerate(features):
            if isinstance(module, nn.MaxPool2d) and pooling == "avg":
                features[i] = nn.AvgPool2d(kernel_size=2, stride=2)
        features = features.to_empty(device="cpu")
        features.load_state_dict({k: v for k, v in state_dict.items() if int(k.split(".")[0]) <= last})
        # channels_last (NHWC) is what cuDNN's and oneDNN's fastest convolutions want: measured
        # 0.22 vs 0.26 s per forward+backward at 256 px on this project's 2-core CPU machine.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.features = features.to(memory_format=self.memory_format).eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))
        # Each requested index -> positions in the output tuple (a layer may be asked for twice,
        # e.g. conv4_2 as content and style layer).
        self._slots: dict[int, list[int]] = {}
        for slot, index in enumerate(self.indices):
            self._slots.setdefault(index, []).append(slot)

    def train(self, mode: bool = True) -> "VGGFeatures":
        # Dropout/batch-norm free, but keep eval semantics regardless of what callers ask.
        return super().train(False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = ((image - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        out: list[torch.Tensor | None] = [None] * len(self.indices)
        for index, module in enumerate(self.features):
            x = module(x)
            for slot in self._slots.get(index, ()):
                out[slot] = x
        return tuple(out)  # type: ignore[arg-type]
