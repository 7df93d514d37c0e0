"""Tiled style transfer gives the untiled objective; multi-scale; out-of-memory falls back to tiles."""

from __future__ import annotations

import pytest
import torch

from fastnst import StyleConfig, render
from fastnst import api
from fastnst.objective import StyleObjective, feature_layers
from fastnst.run import Inputs, Runtime, make_objective
from fastnst.tiling import exact_halo, tile_grid
from fastnst.vgg import VGGFeatures, random_state_dict


def _tiled(network, content, style, config, tile):
    """The run builder's tiled objective (the CPU twins, fp32) over ``network``."""
    runtime = Runtime(device=torch.device("cpu"), precision="fp32", backend="torch", cuda_graph=False,
                      network=network)
    return make_objective(runtime, config, Inputs(content=content, styles=[style]), tile=tile)


def test_exact_halo_follows_the_receptive_field():
    # conv5_1: a tile edge's padding reaches 80 px (derivation in tiling.exact_halo).
    assert exact_halo(["conv5_1"]) == 80
    assert exact_halo(["conv4_2", "conv1_1"]) == 48
    assert exact_halo(["conv1_1"]) == 16  # one pixel, rounded up to the pooling alignment


def test_tile_grid_partitions_the_image_on_a_16px_grid():
    tiles = tile_grid(200, 300, 64, 80)
    covered = torch.zeros(200, 300, dtype=torch.int32)
    for tile in tiles:
        y0, y1, x0, x1 = tile.interior
        covered[y0:y1, x0:x1] += 1
        assert y0 % 16 == 0 and x0 % 16 == 0
        ry0, ry1, rx0, rx1 = tile.region
        assert ry0 == max(0, y0 - 80) and ry1 == min(200, y1 + 80) and rx0 % 16 == 0
    assert torch.equal(covered, torch.ones_like(covered))
    assert [t.interior[:2] for t in tile_grid(208, 64, 64, 0)][-1] == (192, 208)  # 16 px: its own tile
    assert [t.interior[:2] for t in tile_grid(200, 64, 64, 0)][-1] == (128, 200)  # 8 px join a neighbour
    with pytest.raises(ValueError, match="multiple of 16"):
        tile_grid(100, 100, 40, 80)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_tiled_objective_equals_the_untiled_one(pooling):
    """256x192 image, random weights, tiles of 64 and 96 px with the full halo: loss and gradient
    match the untiled objective to 1e-4 relative in fp32 (measured: ~1e-7 and ~3e-6)."""
    config = StyleConfig(pooling=pooling, tv_weight=1e-4)
    g = torch.Generator().manual_seed(0)
    content, style, image = (torch.rand(1, 3, 192, 256, generator=g) for _ in range(3))
    network = VGGFeatures(feature_layers(config), random_state_dict(1), pooling=pooling)
    untiled = StyleObjective(network, content, [style], config)
    x = image.clone().requires_grad_(True)
    loss = untiled(x)
    (grad,) = torch.autograd.grad(loss, x)
    for tile in (64, 96):
        tiled = _tiled(network, content, style, config, tile)
        assert len(tiled.tiles) == (12 if tile == 64 else 6)
        tiled_losses, tiled_grad = tiled.loss_and_grad(image)
        torch.testing.assert_close(tiled_losses[0], loss, rtol=1e-4, atol=0)
        torch.testing.assert_close(tiled_grad, grad, rtol=0, atol=1e-4 * grad.abs().max().item())
        for ours, theirs in zip(tiled.objective.style_targets, untiled.style_targets):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
        for ours, theirs in zip(tiled.objective.content_targets, untiled.content_targets):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_a_smaller_halo_is_only_approximate():
    config = StyleConfig()
    g = torch.Generator().manual_seed(1)
    content, style, image = (torch.rand(1, 3, 128, 128, generator=g) for _ in range(3))
    network = VGGFeatures(feature_layers(config), random_state_dict(1))
    x = image.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(StyleObjective(network, content, [style], config)(x), x)
    _, rough = _tiled(network, content, style, config.replace(tile_halo=16), 32).loss_and_grad(image)
    assert (rough - grad).abs().max() > 1e-3 * grad.abs().max()


def test_tiled_runs_end_to_end_and_auto_keeps_small_images_untiled(content_path, style_path, small_config):
    notes = []
    tiled = render(content_path, style_path, small_config, tile=32, iterations=5)
    assert tiled.tile == 32 and not tiled.cuda_graph and tiled.loss < tiled.losses[0][1]
    auto = render(content_path, style_path, small_config, tile="auto", iterations=2, notify=notes.append)
    assert auto.tile is None and any("untiled (the whole image fits)" in note for note in notes)


def test_out_of_memory_falls_back_to_tiles_once(content_path, style_path, small_config, monkeypatch):
    real = api.build_run
    attempts = []

    def untiled_runs_out_of_memory(runtime, config, inputs, *, tile=None, shard=None):
        attempts.append(tile)
        if tile is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(runtime, config, inputs, tile=tile, shard=shard)

    monkeypatch.setattr(api, "build_run", untiled_runs_out_of_memory)
    notes = []
    result = render(content_path, style_path, small_config, iterations=2, notify=notes.append)
    assert attempts[0] is None and attempts[1] is not None and result.tile == attempts[1]
    assert any("retrying once with --tile" in note for note in notes)


def test_out_of_memory_with_tiles_is_a_clear_error(content_path, style_path, small_config, monkeypatch):
    def always_out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    monkeypatch.setattr(api, "build_run", always_out_of_memory)
    with pytest.raises(api.RunError, match="out of memory .* with 32 px tiles; use a smaller tile"):
        render(content_path, style_path, small_config, tile=32, iterations=2)


def test_multi_scale(content_path, style_path, small_config):
    result = render(content_path, style_path, small_config, scales=(32, 64), scale_iterations=(3, 2))
    assert result.image.shape == (1, 3, 48, 64) and result.iterations == 5
    assert [i for i, _ in result.losses] == [1, 2, 3, 4, 5]
    ladder = small_config.replace(start_size=32, size=64)
    assert ladder.scale_sizes() == (32, 45, 64)
    assert render(content_path, style_path, ladder, iterations=1).iterations == 3


def test_multi_scale_options_are_checked():
    with pytest.raises(api.ConfigError, match="--scales must increase"):
        StyleConfig(scales=(64, 32)).validate()
    with pytest.raises(api.ConfigError, match="not both"):
        StyleConfig(scales=(32, 64), start_size=32).validate()
    with pytest.raises(api.ConfigError, match="one value per scale"):
        StyleConfig(scales=(32, 64), scale_iterations=(1,)).validate()
    with pytest.raises(api.ConfigError, match="--tile must be auto or a multiple of 16"):
        StyleConfig(tile="40").validate()


def test_tile_auto_measures_the_planner_once_per_render(content_path, style_path, small_config, monkeypatch):
    """The planner's model does not depend on the image size: a multi-scale render measures it once."""
    real, calls = api.calibrate, []

    def counted(config, device):
        calls.append(device)
        return real(config, device, sizes=(32, 64))

    monkeypatch.setattr(api, "calibrate", counted)
    notes = []
    result = render(content_path, style_path, small_config, tile="auto", scales=(32, 64), iterations=1,
                    notify=notes.append)
    assert result.iterations == 2 and len(calls) == 1
    assert sum("--tile auto at" in note for note in notes) == 2
