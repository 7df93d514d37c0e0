"""Every Triton launch fits CUDA's grid limits, for every VGG19 layer at every image size.

CUDA refuses a launch with more than 2^31 - 1 programs on grid axis 0 or more than 65,535 on axes
1 and 2 ("invalid argument"); Triton's interpreter enforces neither, so the kernel tests cannot see
it.  Here every launch is intercepted and only recorded (nothing is computed): the features are
meta tensors of the real shapes, so even a 16384 px image costs no memory.  The launchers run
exactly as the engine calls them: style loss forward and backward (one layer, and all style layers
grouped in one launch each way), Gram forward and backward (the tiled surrogate), content loss
forward and backward, with the split the launcher would pick on an H100 (132 SMs) or a larger GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastnst.kernels import triton_content_loss, triton_gram, triton_style_loss  # noqa: E402
from fastnst.vgg import LAYER_NAMES, layer_channels, layer_stride  # noqa: E402

AXIS_LIMITS = (2**31 - 1, 65_535, 65_535)  # CUDA: gridDim.x, gridDim.y, gridDim.z
LAUNCHED = {"_gram_kernel", "_gram_backward_kernel", "_content_forward_kernel", "_content_backward_kernel",
            "_grouped_gram_kernel", "_grouped_gram_backward_kernel"}
STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
# Square sides from the smallest image to 16384 px, including odd ones (VGG's poolings floor).
SQUARE_SIDES = (16, 33, 512, 1000, 2048, 2049, 4096, 8192, 12288, 16384)
# Very wide or tall images, up to the longest side --size accepts.
WIDE_SHAPES = ((16, 65536), (65536, 16), (48, 16384), (256, 32768))


@pytest.fixture
def launches(monkeypatch):
    """Record (kernel name, grid) of every Triton launch instead of running it."""
    recorded = []

    def record(self, *args, grid, warmup=False, **kwargs):
        if callable(grid):
            grid = grid(kwargs)
        recorded.append((self.fn.__name__, tuple(grid)))

    monkeypatch.setattr(type(triton_gram._gram_kernel), "run", record)
    return recorded


def _on_gpu_with(monkeypatch, sms: int) -> None:
    """The launchers pick their split as they would on a CUDA device with ``sms`` multiprocessors."""
    monkeypatch.setattr(triton_gram, "programs_wanted", lambda device: triton_gram.PROGRAMS_PER_SM * sms)


def _features(batch, layer, height, width, dtype, layout):
    stride = layer_stride(layer)
    shape = (batch, layer_channels(layer), height // stride, width // stride)
    x = torch.empty(shape, dtype=dtype, device="meta")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _engine_launches(x: torch.Tensor) -> None:
    """Every launch the engine can make on features x: style loss, Gram (targets and the tiled
    surrogate) and content loss, each forward and backward."""
    channels = x.shape[1]
    target = torch.empty(channels, channels, device="meta")
    leaf = x.detach().requires_grad_(True)
    torch.autograd.grad(triton_style_loss.style_loss(leaf, target, 1.0), leaf)
    torch.autograd.grad(triton_gram.gram(leaf).sum(), leaf)
    torch.autograd.grad(triton_content_loss.content_loss(leaf, x.detach()), leaf)


def _grouped_launches(features: list[torch.Tensor]) -> None:
    """The engine's grouped style losses over several layers, forward and backward."""
    leaves = [x.detach().requires_grad_(True) for x in features]
    targets = [torch.empty(x.shape[1], x.shape[1], device="meta") for x in features]
    torch.autograd.grad(triton_style_loss.grouped_style_losses(leaves, targets).sum(), leaves)


def _out_of_limits(launches) -> list[str]:
    bad = []
    for name, grid in launches:
        if not 1 <= len(grid) <= 3 or any(n < 1 or n > limit for n, limit in zip(grid, AXIS_LIMITS)):
            bad.append(f"{name}{grid}")
    return bad


@pytest.mark.parametrize("sms", [132, 1024], ids=["H100", "1024-SMs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_every_layer_and_size_launches_within_cuda_limits(launches, monkeypatch, sms, dtype, layout):
    _on_gpu_with(monkeypatch, sms)
    shapes = [(side, side) for side in SQUARE_SIDES] + list(WIDE_SHAPES)
    for height, width in shapes:
        for layer in LAYER_NAMES:
            if height // layer_stride(layer) and width // layer_stride(layer):
                before = len(launches)
                _engine_launches(_features(1, layer, height, width, dtype, layout))
                assert len(launches) - before == 6, f"{layer} at {width}x{height}: launches not intercepted"
        styles = [_features(1, layer, height, width, dtype, layout) for layer in STYLE_LAYERS
                  if height // layer_stride(layer) and width // layer_stride(layer)]
        before = len(launches)
        _grouped_launches(styles)
        assert len(launches) - before == 2, f"{width}x{height}: grouped launches not intercepted"
    assert {name for name, _ in launches} == LAUNCHED
    bad = _out_of_limits(launches)
    assert not bad, f"{len(bad)} launches outside CUDA's grid limits, e.g. {bad[:5]}"


@pytest.mark.parametrize("batch, side", [(16, 2048), (70_000, 16)], ids=["batch-16-2048px", "batch-70000-16px"])
def test_batches_launch_within_cuda_limits(launches, monkeypatch, batch, side):
    """The batch never sits on a limited axis: 70,000 tiny images in one batch still launch."""
    _on_gpu_with(monkeypatch, 132)
    for layer in ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv4_2", "conv5_1"):
        _engine_launches(_features(batch, layer, side, side, torch.bfloat16, "channels_last"))
    _grouped_launches([_features(batch, layer, side, side, torch.bfloat16, "channels_last") for layer in STYLE_LAYERS])
    bad = _out_of_limits(launches)
    assert not bad, f"launches outside CUDA's grid limits: {bad[:5]}"


def test_the_old_conv1_1_backward_grid_would_have_been_refused(launches, monkeypatch):
    """The interception sees what CUDA would refuse: a grid with 65,536 on axis 1 is flagged."""
    assert _out_of_limits([("_gram_backward_kernel", (1, 65_536, 1))])
    _on_gpu_with(monkeypatch, 132)
    _engine_launches(_features(1, "conv1_1", 2048, 2048, torch.bfloat16, "contiguous"))
    backward = [grid for name, grid in launches if name == "_gram_backward_kernel"]
    assert backward and all(len(grid) == 1 and grid[0] >= 65_536 for grid in backward)


def test_positions_beyond_the_kernels_index_range_are_refused_clearly():
    x = torch.empty(1, 64, 2**15 + 16, 2**15, device="meta")
    with pytest.raises(ValueError, match="evaluate the image in tiles"):
        triton_gram.launch_gram(x)
    with pytest.raises(ValueError, match="evaluate the image in tiles"):
        triton_gram.launch_gram_backward(torch.empty(1, 64, 64, device="meta"), x)
    with pytest.raises(ValueError, match="more than CUDA's"):
        triton_gram.grid_1d(2**31, "a kernel")


def test_scratch_parts_start_on_64_byte_boundaries(launches, monkeypatch):
    """The loss, the arrival counters and the split workspace share one zeroed buffer; each part
    begins on a multiple of 16 elements (the old layout put them 4 and 8 bytes in)."""
    seen = []

    def record(self, *args, grid, warmup=False, **kwargs):
        if self.fn.__name__ == "_gram_kernel":
            _, _, _, workspace, counters, loss = args[:6]
            seen.append((loss.storage_offset(), counters.storage_offset(), workspace.storage_offset()))
        elif self.fn.__name__ == "_grouped_gram_kernel":  # one buffer, each layer's parts at offsets
            workspaces_at, counters_at = args[5], args[6]
            seen.append(tuple(workspaces_at) + tuple(counters_at))

    monkeypatch.setattr(type(triton_gram._gram_kernel), "run", record)
    _on_gpu_with(monkeypatch, 132)
    for channels in (3, 64, 130, 512):
        for batch in (1, 3):
            triton_gram.launch_gram(torch.empty(batch, channels, 4099, device="meta"))
            features = [torch.empty(batch, c, 4099, device="meta") for c in (3, 64, channels)]
            targets = [torch.empty(c, c, device="meta") for c in (3, 64, channels)]
            triton_gram.launch_grouped_style_losses(features, targets, [1.0] * 3)
    assert len(seen) == 16
    for offsets in seen:
        assert all(offset % triton_gram.SCRATCH_ALIGN == 0 for offset in offsets), offsets
