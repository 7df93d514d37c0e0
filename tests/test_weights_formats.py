"""VGG19 weights in three formats: torchvision's, the Caffe conversion and the normalised Caffe
network, recognised by layout and file name, each run with its own preprocessing.  Every file here
is generated from seeded random weights (never a download)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastnst import StyleConfig
from fastnst.config import default_loss_weights
from fastnst.errors import WeightsError
from fastnst.objective import StyleObjective, feature_layers
from fastnst.vgg import CAFFE_MEAN_BGR, LAYERS, VGGFeatures, load_network_weights, random_state_dict

from .conftest import random_image


def _named(state: dict) -> dict:
    """The normalised VGG19's layout: conv1_1.weight ... conv5_4.bias (vgg_conv.pth)."""
    index_to_name = {LAYERS[name][0] - 1: name for name in LAYERS if name.startswith("conv")}
    return {f"{index_to_name[int(key.split('.')[0])]}.{key.split('.')[1]}": value for key, value in state.items()}


def _torchvision_layout(state: dict) -> dict:
    """torchvision's full vgg19 state dict: features.N.* and a classifier (ignored when loading)."""
    full = {f"features.{key}": value for key, value in state.items()}
    full["classifier.0.weight"] = torch.zeros(4, 4)
    return full


@pytest.fixture(scope="module")
def state():
    return random_state_dict(seed=11)


@pytest.mark.parametrize("filename, layout, expected", [
    ("my_vgg.pth", _torchvision_layout, "torchvision"),
    ("vgg19-dcbb9e9d.pth", _torchvision_layout, "torchvision"),
    ("vgg19-d01eb7cb.pth", _torchvision_layout, "caffe"),
    ("vgg_conv.pth", _named, "caffe-normalised"),
    ("renamed.pth", _named, "caffe-normalised"),
])
def test_each_layout_loads_and_auto_recognises_its_format(tmp_path, state, filename, layout, expected):
    path = tmp_path / filename
    torch.save(layout(state), path)
    loaded = load_network_weights(str(path))
    assert loaded.format == expected and loaded.reason
    assert loaded.state.keys() == state.keys()
    assert all(torch.equal(loaded.state[key], state[key]) for key in state)


def test_a_format_given_explicitly_wins_and_unknown_layers_are_refused(tmp_path, state):
    path = tmp_path / "vgg_conv.pth"
    torch.save(_named(state), path)
    assert load_network_weights(str(path), "caffe").format == "caffe"
    assert load_network_weights("random", "caffe-normalised").format == "caffe-normalised"
    bad = {**_named(state), "conv6_1.weight": torch.zeros(1)}
    torch.save(bad, path)
    with pytest.raises(WeightsError, match="unexpected key 'conv6_1.weight'"):
        load_network_weights(str(path))
    missing = _named(state)
    missing.pop("conv3_2.bias")
    torch.save(missing, path)
    with pytest.raises(WeightsError, match="missing key 'conv3_2.bias'"):
        load_network_weights(str(path))
    wrong = {**_named(state), "conv2_1.weight": torch.zeros(3, 3)}
    torch.save(wrong, path)
    with pytest.raises(WeightsError, match=r"'conv2_1.weight' has shape \(3, 3\)"):
        load_network_weights(str(path))


def _caffe_forward(state: dict, image: torch.Tensor, last: int) -> dict[int, torch.Tensor]:
    """The Caffe network written out by hand: BGR, 0-255, minus the mean pixel, then VGG19 with
    the weights exactly as stored (no channel flip), max pooling; returns ReLU outputs by index."""
    x = image[:, [2, 1, 0]] * 255.0 - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    outputs, index = {}, 0
    for block in (2, 2, 4, 4, 4):
        for _ in range(block):
            x = F.relu(F.conv2d(x, state[f"{index}.weight"], state[f"{index}.bias"], padding=1))
            outputs[index + 1] = x
            index += 2
            if index > last:
                return outputs
        x = F.max_pool2d(x, 2)
        index += 1
    return outputs


@pytest.mark.parametrize("weights_format", ["caffe", "caffe-normalised"])
def test_caffe_features_equal_a_hand_written_bgr_0_255_mean_subtracted_forward(state, weights_format):
    layers = ("conv1_1", "conv2_1", "conv3_1", "conv4_2", "conv5_1")
    net = VGGFeatures(layers, state, channels_last=False, weights_format=weights_format)
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = net(image)
        theirs = _caffe_forward(state, image, max(LAYERS[name][0] for name in layers))
    for name, feature in zip(layers, ours):
        expected = theirs[LAYERS[name][0]]
        torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # and it is not torchvision's preprocessing: the same weights give other features there
    torchvision = VGGFeatures(layers, state, channels_last=False)(image)
    assert not torch.allclose(torchvision[0], ours[0], rtol=0.1)


def test_the_default_loss_weights_follow_the_format(state):
    config = StyleConfig(style_layers=("conv1_1", "conv2_1"), content_layers=("conv2_2",))
    g = torch.Generator().manual_seed(4)
    content, style = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    for weights_format, (alpha, beta) in (("torchvision", (1.0, 1e6)), ("caffe", (5.0, 100.0)),
                                          ("caffe-normalised", (1.0, 1e3))):
        net = VGGFeatures(feature_layers(config), state, weights_format=weights_format)
        objective = StyleObjective(net, content, [style], config)
        assert (objective.alpha, objective.beta) == (alpha, beta) == default_loss_weights("gram", weights_format)
    given = StyleObjective(net, content, [style], config.replace(content_weight=2.0, style_weight=3.0))
    assert (given.alpha, given.beta) == (2.0, 3.0)
    meancov = StyleObjective(net, content, [style], config.replace(style_loss="meancov"))
    assert (meancov.alpha, meancov.beta) == (0.015, 1.0) and meancov.style_layer_weights == (0.5, 0.5)


def test_verbose_says_which_format_auto_picked(tmp_path, state):
    path = tmp_path / "vgg_conv.pth"
    torch.save(_named(state), path)
    content, style = random_image(tmp_path / "c.png", seed=1), random_image(tmp_path / "s.png", seed=2)
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "fastnst", "stylize", str(content), str(style), "-o", str(out),
                           "--weights", str(path), "--size", "32", "--iterations", "2", "--device", "cpu",
                           "--verbose"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "weights caffe-normalised (keys conv1_1.weight" in done.stderr and out.exists()


def test_the_configs_formats_are_the_networks():
    from fastnst.config import WEIGHTS_FORMATS
    from fastnst.vgg import FORMATS, PREPROCESSING

    assert WEIGHTS_FORMATS == ("auto", *FORMATS) and set(PREPROCESSING) == set(FORMATS)
