"""The device-resident optimisers against torch.optim, step for step."""

from __future__ import annotations

import pytest
import torch

from fastnst import StyleConfig
from fastnst.run import initial_image, make_step
from fastnst.objective import Autograd, StyleObjective, feature_layers
from fastnst.optim import LBFGS, Adam, lbfgs_state_bytes
from fastnst.vgg import VGGFeatures, random_state_dict


def _quadratic(n=40, seed=0, solution_in_unit_range=False):
    """f(x) = 1/2 x^T Q x - b^T x with Q symmetric positive definite and badly conditioned;
    optionally b chosen so that the minimiser lies in [0, 1]^n, like an image's."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q = (basis * torch.logspace(-2, 2, n, dtype=torch.float64)) @ basis.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    if solution_in_unit_range:
        b = q @ torch.rand(n, generator=g, dtype=torch.float64)
    return (lambda x: 0.5 * x @ q @ x - b @ x), torch.linalg.solve(q, b)


def _torch_lbfgs_trajectory(loss_fn, x0, steps, lr, history):
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=lr, max_iter=steps, max_eval=10 * steps, history_size=history,
                            tolerance_grad=-1.0, tolerance_change=0.0, line_search_fn=None)
    losses = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        losses.append(loss.item())
        return loss

    opt.step(closure)
    return x.detach(), losses


def _our_trajectory(loss_fn, x0, steps, lr, history):
    x = x0.clone().unsqueeze(0).requires_grad_(True)  # a batch of one
    opt = LBFGS(x, lr=lr, history=history, steps="torch")
    step = make_step(Autograd(lambda batch: loss_fn(batch[0])), opt)
    losses = [step(x).item() for _ in range(steps)]
    return x.detach()[0], losses


@pytest.mark.parametrize("history", [3, 10])
def test_lbfgs_matches_torch_on_a_convex_quadratic(history):
    loss_fn, solution = _quadratic()
    x0 = torch.zeros(40, dtype=torch.float64)
    # float64 here: the match is exact up to rounding; 25 steps also exercise the ring wrap-around.
    theirs, their_losses = _torch_lbfgs_trajectory(loss_fn, x0, 25, 1.0, history)
    ours, our_losses = _our_trajectory(loss_fn, x0.float().double(), 25, 1.0, history)
    assert len(their_losses) == len(our_losses) == 25
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    assert loss_fn(ours) < 0.5 * loss_fn(x0)  # and it does minimise
    assert (ours - solution).norm() < (x0 - solution).norm()


@pytest.mark.parametrize("seed", [2, 3, 6])
def test_lbfgs_in_fp32_is_as_accurate_as_torchs(seed):
    """fp32 iterates on a badly conditioned quadratic (condition 1e4), 20 steps, history 5.

    Ours forms H g in compact form, torch by the two-loop recursion: the same update in exact
    arithmetic, rounded differently, and 20 steps amplify fp32 rounding to ~1e-5 relative (torch's
    own fp32 trajectory is up to 1.9e-5 off the float64 one on these seeds).  So: ours is no
    further from the float64 trajectory than 2x torch's fp32 error (or 5e-6, the rounding floor
    seen on seeds where torch is lucky), and the two fp32 runs agree to 1e-4."""
    loss_fn64, _ = _quadratic(n=30, seed=seed)
    loss_fn = lambda x: loss_fn64(x.double()).float()  # noqa: E731 - fp32 iterates, fp64 function
    x0 = torch.zeros(30)
    exact, _ = _torch_lbfgs_trajectory(loss_fn64, x0.double(), 20, 1.0, 5)
    theirs, their_losses = _torch_lbfgs_trajectory(loss_fn, x0, 20, 1.0, 5)
    ours, our_losses = _our_trajectory(loss_fn, x0, 20, 1.0, 5)

    def error(x):
        return ((x.double() - exact).abs().max() / exact.abs().max()).item()

    assert error(ours) <= max(2 * error(theirs), 5e-6)
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())


def test_lbfgs_matches_torch_on_the_style_objective():
    """fp32 on the CPU at 64 px (64 x 48), default layers, five-pair history, 15 steps.

    A fixed-step L-BFGS on this objective overshoots wildly at times (the loss jumps by 1e3x), so
    a free-running comparison would mostly measure chaos: one ulp of difference in x + t d (torch
    adds with a host scalar, fused; ours multiplies by a device scalar, then adds) grows to O(1).
    So each step starts both optimisers from torch's iterate, with torch's gradient there, while
    each keeps its own history; every step must then agree to fp32 rounding."""
    config = StyleConfig(size=64)
    g = torch.Generator().manual_seed(4)
    content, style = torch.rand(1, 3, 48, 64, generator=g), torch.rand(1, 3, 48, 64, generator=g)
    net = VGGFeatures(feature_layers(config), random_state_dict(2), pooling="max")
    objective = StyleObjective(net, content, [style], config)
    theirs = initial_image("noise", content, style, seed=0).requires_grad_(True)
    reference = torch.optim.LBFGS([theirs], lr=1.0, max_iter=1, history_size=5, tolerance_grad=-1.0,
                                  tolerance_change=0.0, line_search_fn=None)
    ours = theirs.detach().clone().requires_grad_(True)
    optimizer = LBFGS(ours, lr=1.0, history=5, steps="torch")
    losses = []
    for _ in range(15):
        start = theirs.detach().clone()
        with torch.no_grad():
            ours.copy_(start)
        (grad,) = torch.autograd.grad(objective(theirs), theirs)

        def closure():
            reference.zero_grad()
            loss = objective(theirs)
            loss.backward()
            return loss

        losses.append(reference.step(closure).item())
        optimizer.update(ours, grad)
        their_step, our_step = theirs.detach() - start, ours.detach() - start
        # x + step is rounded to x's precision: allow a few ulps of x on top of 2e-4 of the step.
        # The two-loop recursion's dot products are summed in another order than torch's, and
        # after the loss's 1e9x overshoots the pairs are ill-conditioned: on 40 px steps the
        # difference measured 1.4e-5 of the step with two threads and 8.6e-5 with one (pytest
        # -n gives each worker one); a different algorithm differs by O(1).
        ulps = 4 * torch.finfo(torch.float32).eps * start.abs().max().item()
        torch.testing.assert_close(our_step, their_step, rtol=1e-4,
                                   atol=2e-4 * their_step.abs().max().item() + ulps)
    assert min(losses) < 0.9 * losses[0]


def test_lbfgs_state_is_sized_by_history():
    x = torch.zeros(1, 3, 8, 8)
    assert LBFGS(x, history=7).state_bytes == (2 * 7 + 4) * x.numel() * 4 == lbfgs_state_bytes(7, 64)


def test_adam_matches_torch_adam_without_bounds():
    loss_fn, _ = _quadratic(n=30, seed=1)
    x0 = torch.randn(30, dtype=torch.float64)
    theirs = x0.clone().requires_grad_(True)
    reference = torch.optim.Adam([theirs], lr=0.05)
    ours = x0.clone().requires_grad_(True)
    step = make_step(Autograd(loss_fn), Adam(ours, lr=0.05, bounds=None))
    for _ in range(30):
        reference.zero_grad()
        loss_fn(theirs).backward()
        reference.step()
        step(ours)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


def test_adam_in_fp32_follows_torch_adam_to_rounding():
    """With float32 bias corrections the step was off by up to 1e-5 relative (1 - 0.999**t in
    float32), and 300 steps drifted 2.8e-6 from torch.optim.Adam; formed in float64, as torch's
    Python floats are, and applied in addcdiv_'s order, the trajectories agree (bit for bit here)."""
    g = torch.Generator().manual_seed(0)
    x0, target = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)

    def loss_fn(x):
        return ((x - target) ** 3).abs().sum()

    theirs = x0.clone().requires_grad_(True)
    reference = torch.optim.Adam([theirs], lr=0.02, foreach=False)
    ours = x0.clone().requires_grad_(True)
    step = make_step(Autograd(loss_fn), Adam(ours, lr=0.02, bounds=None))
    worst = 0.0
    for _ in range(300):
        reference.zero_grad()
        loss_fn(theirs).backward()
        reference.step()
        step(ours)
        worst = max(worst, ((ours - theirs).abs().max() / theirs.abs().max()).item())
    assert worst < 5e-7


def test_adam_projects_onto_the_pixel_range():
    x = torch.full((1, 3, 4, 4), 0.99, requires_grad=True)
    step = make_step(Autograd(lambda img: -img.sum() * 100), Adam(x, lr=0.5))
    step(x)
    assert x.max().item() == 1.0 and x.min().item() >= 0.0


@pytest.mark.parametrize("steps", ["bounded", "torch"])
def test_a_batch_of_lbfgs_samples_equals_separate_runs(steps):
    """Four samples, each its own problem: two convex with different curvatures, one concave
    (every curvature pair is rejected, so it keeps taking first steps) and one convex whose
    gradient changes sign of curvature half-way.  Stepped as one batch, each sample follows
    exactly (bit for bit, one thread) the trajectory it follows alone, with its own history."""
    g = torch.Generator().manual_seed(3)
    shape = (4, 3, 10, 12)
    curvature = torch.rand(shape, generator=g) + 0.2
    curvature[2] = -0.5  # concave: s.y < 0
    start = torch.rand(shape, generator=g)

    def gradient(x, k, samples):
        c = curvature[samples]
        flip = torch.where(torch.arange(4)[samples].view(-1, 1, 1, 1) == 3, (-1.0) ** (k // 6), 1.0)
        return c * flip * (x - 0.3) + 0.05 * torch.sin(7 * x)

    def run(samples):
        x = start[samples].clone()
        opt = LBFGS(x, history=3, steps=steps)
        trajectory = []
        for k in range(14):
            opt.update(x, gradient(x, k, samples))
            trajectory.append(x.clone())
        return trajectory, opt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together, opt = run(slice(0, 4))
        for b in range(4):
            alone, _ = run(slice(b, b + 1))
            assert all(torch.equal(a[0], t[b]) for a, t in zip(alone, together)), b
    finally:
        torch.set_num_threads(threads)
    assert opt.count[2] == 0 and opt.count[0] == 3  # the concave sample kept no pair, the others did


def test_bounded_steps_size_the_first_step_from_the_pixel_range_and_bound_every_step():
    """The first step moves the pixel of largest gradient by exactly lr/16, whatever the gradient's
    scale (torch's would move it by 1e-9 here), and no later step moves any pixel by more than lr/4."""
    g = torch.Generator().manual_seed(5)
    weights = torch.rand(1, 3, 6, 7, generator=g, dtype=torch.float64) + 0.5
    x = torch.full((1, 3, 6, 7), 0.5, dtype=torch.float64)
    opt = LBFGS(x, lr=0.8, history=4)
    largest = []
    for k in range(8):
        before = x.clone()
        grad = 1e-9 * weights * (x - 0.1) ** 3  # a flat quartic: its secant model overshoots
        opt.update(x, grad)
        largest.append((x - before).abs().max().item())
    assert largest[0] == pytest.approx(0.8 / 16, rel=1e-12)
    assert max(largest) <= 0.8 / 4 * (1 + 1e-12)
    assert max(largest[1:]) > 0.8 / 16  # later steps do take their own (larger) scale


def test_bounded_steps_are_the_same_at_any_loss_scale_and_torchs_are_not():
    """Multiplying the loss by 1e-8 changes nothing in the bounded rule (every quantity it uses is
    scale-free) but stalls torch's rule: its first step is lr min(1, 1/|g|_1) = g itself, and the
    pairs after it have s.y below torch's absolute 1e-10, so it never leaves unit-step gradient
    descent, as fastnst's fp32 runs on torchvision-initialised weights did."""
    loss_fn, solution = _quadratic(n=40, seed=4, solution_in_unit_range=True)
    x0 = torch.full((40,), 0.5, dtype=torch.float64)
    ours, our_losses = _bounded_trajectory(loss_fn, x0, 20)
    scaled, scaled_losses = _bounded_trajectory(lambda x: 1e-8 * loss_fn(x), x0, 20)
    torch.testing.assert_close(scaled, ours, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(scaled_losses) * 1e8, torch.tensor(our_losses), rtol=1e-6, atol=0)
    # and it minimises: 99% of the way from the start's loss to the minimum
    best = loss_fn(solution).item()
    assert our_losses[-1] - best < 0.01 * (our_losses[0] - best)
    _, torch_losses = _torch_lbfgs_trajectory(lambda x: 1e-8 * loss_fn(x), x0, 20, 1.0, 20)
    assert torch_losses[-1] - 1e-8 * best > 0.99 * (torch_losses[0] - 1e-8 * best)  # torch's rule: stalled


def _bounded_trajectory(loss_fn, x0, steps):
    x = x0.clone().unsqueeze(0).requires_grad_(True)
    opt = LBFGS(x, lr=1.0, history=20)
    step = make_step(Autograd(lambda batch: loss_fn(batch[0])), opt)
    losses = [step(x).item() for _ in range(steps)]
    return x.detach()[0], losses


def test_bounded_steps_skip_pairs_whose_gradient_change_is_noise():
    """A gradient change uncorrelated with the step (rounding noise) is not curvature: the bounded
    rule keeps no such pair (torch's keeps those with s.y > 1e-10, about half of them), while a
    real curvature pair of the same size is kept."""
    g = torch.Generator().manual_seed(6)
    shape = (1, 3, 64, 64)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    kept = {}
    for steps in ("bounded", "torch"):
        x = torch.zeros(shape, dtype=torch.float64)
        opt = LBFGS(x, history=30, steps=steps)
        for _ in range(30):
            noise = 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64)
            opt.update(x, base + noise)
        kept[steps] = int(opt.count)
    assert kept["bounded"] == 0 and kept["torch"] >= 5
    x = torch.zeros(shape, dtype=torch.float64)
    opt = LBFGS(x, history=30)
    for _ in range(3):
        opt.update(x, base + 0.5 * x + 1e-2 * torch.randn(shape, generator=g, dtype=torch.float64))
    assert int(opt.count) == 2


def test_the_step_rules_are_the_configs():
    from fastnst.config import LBFGS_STEPS
    from fastnst.optim import STEP_RULES

    assert LBFGS_STEPS == STEP_RULES
    with pytest.raises(ValueError, match="steps must be one of"):
        LBFGS(torch.zeros(1, 3, 2, 2), steps="wolfe")


def test_the_iterate_average_is_bias_corrected_and_lives_in_the_step():
    """--average-decay: after t steps the output is sum_k d^(t-k) (1-d) x_k / (1 - d^t) of the
    iterates x_1..x_t, the image itself before any step; checkpoints and the result hold it."""
    from fastnst.loop import Hooks
    from fastnst.run import Inputs, build_run, resolve_runtime

    config = StyleConfig(size=32, weights="random", optimizer="adam", average_decay=0.8, device="cpu",
                         quiet=True, style_layers=("conv1_1", "conv2_1"), content_layers=("conv2_2",))
    g = torch.Generator().manual_seed(2)
    content, style = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    run = build_run(resolve_runtime(config), config, Inputs(content=content, styles=[style]))
    assert torch.equal(run.output(), run.image.detach())
    iterates = []
    for _ in range(5):
        run.step(run.image)
        iterates.append(run.image.detach().clone())
    d = 0.8
    expected = sum(d ** (5 - k) * (1 - d) * x for k, x in enumerate(iterates, start=1)) / (1 - d**5)
    torch.testing.assert_close(run.output(), expected, rtol=1e-6, atol=1e-7)
    assert (run.output() - run.image.detach()).abs().max() > 1e-3  # not the last iterate
    saved = {}
    result = run.optimise(3, Hooks(progress=False, checkpoint=lambda i, image: saved.update({i: image}),
                                   checkpoint_every=3))
    torch.testing.assert_close(saved[3], run.output().clamp(0, 1))
    torch.testing.assert_close(result.image, saved[3])
