"""The run loop: both optimisers make progress, runs are reproducible, failures are caught."""

from __future__ import annotations

import pytest
import torch

from fastnst import render
from fastnst.loop import Hooks, optimise
from fastnst.objective import Autograd
from fastnst.run import initial_image, make_step
from fastnst.errors import NonFiniteLossError
from fastnst.optim import Adam


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_both_optimisers_lower_the_loss_substantially(optimizer, content_path, style_path, small_config):
    result = render(content_path, style_path, small_config, optimizer=optimizer)
    first, last = result.losses[0][1], result.losses[-1][1]
    assert result.iterations == 20 and len(result.losses) == 20  # read every iteration on the CPU
    assert last < 0.5 * first, (first, last)
    assert result.image.shape == (1, 3, 48, 64)
    assert 0.0 <= result.image.min().item() and result.image.max().item() <= 1.0


def test_same_seed_same_image_other_seed_other_image(content_path, style_path, small_config):
    config = small_config.replace(iterations=5)
    a = render(content_path, style_path, config).image
    b = render(content_path, style_path, config).image
    c = render(content_path, style_path, config, seed=1).image
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_initial_images():
    content = torch.rand(1, 3, 20, 30)
    style = torch.rand(1, 3, 40, 40)
    assert torch.equal(initial_image("content", content, style, 0), content)
    resized = initial_image("style", content, style, 0)
    assert resized.shape == content.shape
    noise = initial_image("noise", content, style, 3)
    assert torch.equal(noise, initial_image("noise", content, style, 3))
    assert 0.4 < noise.mean().item() < 0.6 and noise.std().item() > 0.05


def test_non_finite_loss_stops_with_the_last_finite_image():
    image = torch.full((1, 3, 4, 4), 0.25, requires_grad=True)
    calls = []

    def objective(x):
        calls.append(1)
        value = (x - 1).square().sum()
        return value if len(calls) < 4 else value * float("nan")

    step = make_step(Autograd(objective), Adam(image, lr=0.1))
    with pytest.raises(NonFiniteLossError) as error:
        optimise(step, image, 10, Hooks(progress=False))
    assert "iteration 4" in str(error.value) and "--lr" in str(error.value)
    assert error.value.last_iteration == 2  # the image that the third (finite) loss was taken at
    assert torch.isfinite(error.value.last_image).all()


def test_should_stop_interrupts_and_checkpoints_are_taken():
    image = torch.zeros((1, 3, 4, 4), requires_grad=True)
    step = make_step(Autograd(lambda x: (x - 0.5).square().sum()), Adam(image, lr=0.01))
    saved = []
    calls = iter(range(100))
    result = optimise(step, image, 50, Hooks(progress=False, checkpoint=lambda i, img: saved.append(i),
                                             checkpoint_every=2, should_stop=lambda: next(calls) >= 7))
    assert result.interrupted and result.iterations == 7
    assert saved == [2, 4, 6]
    # Adam moves about lr per step while the gradient keeps its sign: 7 steps of 0.01.
    assert result.image.mean().item() == pytest.approx(0.07, abs=0.005)


@pytest.mark.parametrize("init", ["content", "style", "noise"])
def test_every_init_runs_with_lbfgs(init, content_path, style_path, small_config):
    result = render(content_path, style_path, small_config, init=init, iterations=3)
    assert result.iterations == 3 and torch.isfinite(result.image).all()


def test_initial_image_is_contiguous_whatever_the_content_layout():
    content = torch.rand(1, 8, 6, 3).permute(0, 3, 1, 2)  # HWC memory, like a decoded picture
    for init in ("content", "style", "noise"):
        assert initial_image(init, content, content, 0).is_contiguous()


def test_an_image_file_as_the_start(tmp_path):
    """--init PATH: the file stretched to the content's size (antialiased, like --init style), and
    under --preserve-color luminance its luminance, as the content and styles then are."""
    from PIL import Image

    from fastnst.color import luminance_image
    from fastnst.images import image_to_tensor

    path = tmp_path / "start.png"
    pixels = torch.rand(1, 3, 30, 50, generator=torch.Generator().manual_seed(4))
    Image.fromarray((pixels[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    content = torch.rand(1, 3, 24, 32)
    start = initial_image(str(path), content, content, seed=0)
    expected = initial_image("style", content, image_to_tensor(Image.open(path)), seed=0)
    assert start.shape == (1, 3, 24, 32) and torch.equal(start, expected)
    grey = initial_image(str(path), content, content, seed=0, preserve_color="luminance")
    torch.testing.assert_close(grey, initial_image("style", content, luminance_image(image_to_tensor(
        Image.open(path))), seed=0))
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_the_progress_bar_shows_each_iteration_s_own_loss(monkeypatch):
    """At 10/10 the bar showed iteration 9's loss (the postfix was set after the bar redrew) while
    the summary printed the last one.  Each redraw now carries its own iteration's loss."""
    from fastnst import loop

    drawn = []

    class Bar:
        def __init__(self, *args, **kwargs):
            self.n, self.postfix = 0, None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def set_postfix(self, refresh=True, **values):
            self.postfix = values["loss"]

        def update(self, count):
            self.n += count
            drawn.append((self.n, self.postfix))

    monkeypatch.setattr(loop, "tqdm", Bar)
    image = torch.zeros(1, requires_grad=True)
    losses = iter(float(10 - i) for i in range(10))
    result = loop.optimise(lambda img: torch.tensor([next(losses)]), image, 10, loop.Hooks())
    assert drawn[-1] == (10, f"{result.loss:.4g}") and result.loss == 1.0
    assert [postfix for _, postfix in drawn] == [f"{10 - i:.4g}" for i in range(10)]
