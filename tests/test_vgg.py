"""VGG19 feature extractor: layer names, truncation, freezing, pooling and the three weight sources."""

from __future__ import annotations

import os
from urllib.error import URLError

import pytest
import torch
from torchvision.models import vgg19

from fastnst import vgg
from fastnst.errors import WeightsError
from fastnst.vgg import VGGFeatures, layer_channels, layer_info, load_weights, random_state_dict


def test_layer_names_resolve_to_relu_outputs():
    # torchvision's vgg19.features: conv at even positions within a block, ReLU right after.
    features = vgg19(weights=None).features
    for name in ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv4_2", "conv5_1", "conv5_4"):
        index, channels, _ = layer_info(name)
        assert isinstance(features[index], torch.nn.ReLU)
        assert isinstance(features[index - 1], torch.nn.Conv2d)
        assert features[index - 1].out_channels == channels
        assert layer_info(name.replace("conv", "relu")) == layer_info(name)
    assert layer_info("conv1_1")[0] == 1 and layer_info("conv4_2")[0] == 22 and layer_info("conv5_1")[0] == 29
    assert [layer_channels(f"conv{b}_1") for b in range(1, 6)] == [64, 128, 256, 512, 512]
    assert vgg.layer_stride("conv1_1") == 1 and vgg.layer_stride("conv5_1") == 16
    with pytest.raises(ValueError, match="unknown VGG19 layer 'conv6_1'"):
        layer_info("conv6_1")


def test_features_match_torchvision_vgg19_and_are_frozen():
    state = random_state_dict(seed=3)
    reference = vgg19(weights=None)
    reference.features.load_state_dict(state)
    reference.eval()
    net = VGGFeatures(["conv2_1", "conv4_2", "conv1_1"], state, pooling="max", channels_last=False)
    assert len(net.features) == layer_info("conv4_2")[0] + 1  # truncated after the deepest layer
    assert all(not p.requires_grad for p in net.parameters())
    image = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        ours = net(image)
        x = (image - net.mean) / net.std
        expected = {}
        for index, module in enumerate(reference.features[:23]):
            x = module(x)
            expected[index] = x.clone()
    for name, feature in zip(net.layers, ours):
        torch.testing.assert_close(feature, expected[layer_info(name)[0]], rtol=0, atol=0)
    # channels_last (the default) changes only the summation order of the convolutions.
    nhwc = VGGFeatures(["conv2_1", "conv4_2", "conv1_1"], state, pooling="max")
    with torch.no_grad():
        for a, b in zip(nhwc(image), ours):
            assert a.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
    # Backward through the frozen network reaches the image and no weight.
    image.requires_grad_(True)
    net(image)[1].sum().backward()
    assert image.grad is not None and all(p.grad is None for p in net.parameters())


def test_avg_pooling_replaces_every_max_pool():
    net = VGGFeatures(["conv5_1"], random_state_dict(0), pooling="avg")
    kinds = {type(m) for m in net.features}
    assert torch.nn.AvgPool2d in kinds and torch.nn.MaxPool2d not in kinds
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in net.features) == 4


def test_random_weights_are_seeded():
    a, b, c = random_state_dict(1), random_state_dict(1), random_state_dict(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def _write_hub_checkpoint(torch_home, state):
    path = torch_home / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_imagenet_weights_load_from_the_hub_cache(private_torch_home):
    features = random_state_dict(seed=7)
    # Shaped like torchvision's checkpoint: features.* plus classifier weights we must ignore.
    state = {f"features.{k}": v for k, v in features.items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    path = _write_hub_checkpoint(private_torch_home, state)
    assert vgg.imagenet_cache_path() == path
    loaded = load_weights("imagenet")
    assert loaded.keys() == features.keys()
    assert all(torch.equal(loaded[k], features[k]) for k in features)


def test_imagenet_weights_offline_give_a_clear_error(private_torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as error:
        load_weights("imagenet", progress=False)
    message = str(error.value)
    assert str(vgg.imagenet_cache_path()) in message and "--weights PATH|random" in message
    assert "\n" not in message


def test_weights_file_round_trip(tmp_path):
    features = random_state_dict(seed=5)
    path = tmp_path / "features.pth"
    torch.save(features, path)  # a features-only state dict (no prefix) is accepted too
    loaded = load_weights(str(path))
    assert all(torch.equal(loaded[k], features[k]) for k in features)


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("features.10.weight"), "missing key 'features.10.weight'"),
    (lambda s: s.__setitem__("features.0.weight", torch.zeros(64, 3, 5, 5)),
     r"'0.weight' has shape \(64, 3, 5, 5\), VGG19 needs \(64, 3, 3, 3\)"),
    (lambda s: s.__setitem__("features.99.weight", torch.zeros(1)), "unexpected key 'features.99.weight'"),
])
def test_bad_weights_files_name_the_first_problem(tmp_path, corrupt, message):
    state = {f"features.{k}": v for k, v in random_state_dict(0).items()}
    corrupt(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=message):
        load_weights(str(path))


def test_not_a_checkpoint_and_missing_file(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        load_weights(str(text))
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(str(tmp_path / "absent.pth"))
    listed = tmp_path / "list.pth"
    torch.save([1, 2, 3], listed)
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        load_weights(str(listed))


class _Payload:
    """Unpickling this would run os.system; weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch should-never-exist",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": _Payload()}, path)
    with pytest.raises(WeightsError, match="refused"):
        load_weights(str(path))
    assert not (tmp_path / "should-never-exist").exists()
