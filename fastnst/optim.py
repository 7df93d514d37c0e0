"""L-BFGS and Adam updates whose state lives on the image's device.

Both take the gradient at the current image and update the image in place.  Neither reads a
value back to the host: counters are device tensors, guards are ``torch.where``, and every buffer
is allocated once, so one optimisation step has fixed shapes and can later be captured in a CUDA
graph as it is.
"""

from __future__ import annotations

import torch

# torch.optim.LBFGS skips curvature pairs with s.y at or below this: they would make the
# inverse-Hessian estimate indefinite.  An absolute bound depends on the problem's scale: a loss
# of 0.4 spread over 786,432 pixel values had s.y below it on every step (see below).
CURVATURE_EPS = 1e-10
# fastnst's bounded rule instead skips a pair whose cosine s.y / (|s| |y|) is below
# NOISE_SIGMAS / sqrt(N) (N values per sample): the gradient change y over a step that hardly moved
# the image is rounding noise (bf16 rounds each value to 2^-8 relative), uncorrelated with s, and
# the cosine of such a y with s has standard deviation 1/sqrt(N) (0.0011 for a 512 px image; the
# bf16 pair that let torch's rule escape the stall below had 0.0027).  Scale-free, unlike 1e-10.
NOISE_SIGMAS = 4.0
# fastnst's first step (and the step after a restart) moves the pixel with the largest gradient
# by this much (times lr), whatever the loss's scale; later steps take their scale from the
# curvature pairs.  torch's first step, lr min(1, 1/|g|_1), is tiny when a small gradient is
# spread over many pixels, and pairs from such steps are noise: fp32 L-BFGS then never leaves
# gradient descent with a unit step (loss 0.3813 -> 0.3810 in 20 steps, torchvision-initialised
# random VGG19, 512 px).  1/16 of the [0, 1] range: from 1/64 it took three steps to find a
# pair of positive curvature there.
FIRST_STEP_CHANGE = 1.0 / 16
# fastnst's rule bounds every step's largest pixel change by lr * MAX_STEP_CHANGE (a trust region
# in the max norm, since there is no line search): the quasi-Newton model of a quartic (Gram) loss
# fitted on small steps overshoots on large ones; unbounded, the second step of the same case at
# 256 px changed a pixel by 25 and the loss went to 8e5.  With 1/16 and 1/4 the case goes from
# 0.381 to 0.018 in 20 steps (a bound of 1/2: 0.009, but the loss rose on one step on the way).
MAX_STEP_CHANGE = 0.25
STEP_RULES = ("bounded", "torch")


def lbfgs_state_bytes(history: int, pixels: int, channels: int = 3) -> int:
    """fp32 bytes of L-BFGS state for an image: m (s, y) pairs, the last step and gradient, and two
    image-sized work rows (the gradient and y beside the step, so one product reads the history)."""
    return (2 * history + 4) * channels * pixels * 4


def state_dtype(image: torch.Tensor) -> torch.dtype:
    """Optimiser state is fp32 (fp64 for an fp64 image, as in tests), whatever the image's dtype."""
    return torch.float64 if image.dtype == torch.float64 else torch.float32


def _per_sample_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a[s] @ b[s] for every sample s.  On the CPU one matrix product per sample: a BLAS may take
    another code path for a batched product than for a single one (MKL's strided batched GEMM),
    and a sample's arithmetic must not depend on the batch around it.  Elsewhere one batched
    product, one launch for the whole batch."""
    if a.device.type != "cpu":
        return torch.bmm(a, b)
    return torch.stack([x @ y for x, y in zip(a, b)])


class LBFGS:
    """L-BFGS, fixed step (no line search), for a batch of images (B, ...), in compact form.

    Each sample is its own optimiser.  With ``steps="torch"`` it matches ``torch.optim.LBFGS(lr,
    history_size=m, line_search_fn=None)`` step for step: the first step is scaled by
    min(1, 1/|g|_1), later steps use ``lr``; pairs with s.y <= 1e-10 are skipped; the initial
    inverse Hessian is gamma = s.y / y.y of the newest accepted pair.  The default,
    ``steps="bounded"``, keeps all of that but sizes steps from the image's scale instead of the
    loss's: a fresh start (and every step while no pair is held) moves the largest pixel by
    lr / 16, no step moves a pixel by more than lr / 4, and pairs whose y is rounding noise are
    skipped (constants below).  Where torch would stop because the direction is not a descent
    direction, both restart from steepest descent (history cleared), so a long run never stalls.

    The product H g comes from the compact representation of Byrd, Nocedal & Schnabel (1994),
    not the two-loop recursion: with S, Y the pairs oldest first, R the upper triangle of S'Y,
    D its diagonal,

        H g = gamma g + S w - gamma Y u,   u = R^-1 S'g,   w = R^-T ((D + gamma Y'Y) u - gamma Y'g).

    The history is one (B, 2m, N) tensor of ring slots, read in place by two products per step
    (inner products with [g, s, y], then the combination), batched over the samples on a GPU
    (one per sample on the CPU, see ``_per_sample_matmul``).  The
    ring order lives only in the small m x m matrices S'Y and Y'Y (kept up to date one row and
    column per accepted pair), gathered into age order on the device: no image-sized row is ever
    gathered, nothing is read back to the host, and on a GPU the launches do not depend on B.
    """

    def __init__(self, image: torch.Tensor, lr: float = 1.0, history: int = 20, steps: str = "bounded"):
        if steps not in STEP_RULES:
            raise ValueError(f"steps must be one of {', '.join(STEP_RULES)}, not '{steps}'")
        if not image.is_contiguous():
            raise ValueError("the image must be contiguous (L-BFGS steps a flat view of each sample)")
        batch, n, m = image.shape[0], image[0].numel(), int(history)
        device, dtype = image.device, state_dtype(image)
        self.lr, self.history, self.bounded = float(lr), m, steps == "bounded"
        self.pairs = torch.zeros(batch, 2 * m, n, device=device, dtype=dtype)  # slots: m steps s, then m y
        self.vectors = torch.zeros(batch, 3, n, device=device, dtype=dtype)  # g, last step s, y = g - g_prev
        self.last_grad = torch.zeros(batch, n, device=device, dtype=dtype)
        self.sy = torch.zeros(batch, m, m, device=device, dtype=dtype)  # s_i . y_j by slot
        self.yy = torch.zeros(batch, m, m, device=device, dtype=dtype)  # y_i . y_j by slot
        self.gamma = torch.ones(batch, device=device, dtype=dtype)  # initial inverse-Hessian scale
        self.head = torch.zeros(batch, dtype=torch.long, device=device)  # slot of the next accepted pair
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # pairs held (at most m)
        self.started = torch.zeros(batch, dtype=torch.bool, device=device)
        self._pair_samples = torch.arange(batch, device=device).repeat(2)  # sample of each s row, then y row
        self._ages = torch.arange(m, device=device)

    @property
    def last_step(self) -> torch.Tensor:
        return self.vectors[:, 1]

    @property
    def state_bytes(self) -> int:
        """Device memory held by the optimiser state (the image-sized part)."""
        return sum(t.numel() * t.element_size() for t in (self.pairs, self.vectors, self.last_grad))

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.pairs, self.last_step, self.last_grad, self.sy, self.yy, self.gamma, self.head,
                self.count, self.started]

    def reset(self) -> None:
        """Back to the freshly built state (used after warm-up iterations)."""
        for t in (self.pairs, self.vectors, self.last_grad, self.sy, self.yy, self.head, self.count):
            t.zero_()
        self.gamma.fill_(1.0)
        self.started.fill_(False)

    @torch.no_grad()
    def update(self, image: torch.Tensor, grad: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Step every sample of ``image`` in place.  ``ok`` (a device bool from fp16 loss scaling)
        False means the gradient overflowed: then nothing changes, neither images nor histories."""
        flat = image.view(image.shape[0], -1)
        g = self.vectors[:, 0]
        g.view(image.shape).copy_(grad.detach())  # one pass, whatever the gradient's layout
        torch.sub(g, self.last_grad, out=self.vectors[:, 2])
        products = self._remember(ok)
        direction = self._direction(products)
        bad = torch.linalg.vecdot(g, direction) >= 0  # not a descent direction (breakdown): restart
        if ok is not None:
            bad &= ok
        direction = torch.where(bad[:, None], -g, direction)
        self.count.masked_fill_(bad, 0)
        self.gamma.masked_fill_(bad, 1.0)
        fresh = ~self.started | bad
        if self.bounded:  # no curvature pair held yet: gamma = 1 knows nothing of the scale
            fresh |= self.count == 0
        step_size = torch.where(fresh, self._first_step_size(g), torch.full_like(self.gamma, self.lr))
        step = direction * step_size[:, None]
        if self.bounded:
            step = step * self._step_limit(step)[:, None]
        if ok is None:
            self.last_step.copy_(step)
            flat.add_(step.to(flat.dtype))
            self.last_grad.copy_(g)
            self.started.fill_(True)
        else:  # where(), not multiplication by ok: an overflowed step holds inf and NaN
            flat.add_(torch.where(ok, step, 0.0).to(flat.dtype))
            self.last_step.copy_(torch.where(ok, step, self.last_step))
            self.last_grad.copy_(torch.where(ok, g, self.last_grad))
            self.started |= ok

    def _first_step_size(self, g: torch.Tensor) -> torch.Tensor:
        """(B,) step size along -g of a fresh start: torch's lr min(1, 1/|g|_1), or fastnst's, which
        moves the pixel with the largest gradient by lr * FIRST_STEP_CHANGE."""
        if not self.bounded:
            return torch.clamp(1.0 / g.abs().sum(1), max=1.0) * self.lr
        largest = g.abs().amax(1)
        return self.lr * FIRST_STEP_CHANGE / torch.where(largest > 0, largest, 1.0)

    def _step_limit(self, step: torch.Tensor) -> torch.Tensor:
        """(B,) factor <= 1 that keeps every pixel's change within lr * MAX_STEP_CHANGE."""
        largest = step.abs().amax(1)
        bound = self.lr * MAX_STEP_CHANGE
        return torch.where(largest > bound, bound / torch.where(largest > 0, largest, 1.0), 1.0)

    def _curvature_ok(self, s_dot_y: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) which pairs carry curvature: s.y > 1e-10 (torch's rule), or a cosine of s and y beyond
        what rounding noise gives (the bounded rule, NOISE_SIGMAS; scale-free, and s.y > 0)."""
        if not self.bounded:
            return s_dot_y > CURVATURE_EPS
        noise = NOISE_SIGMAS / s.shape[1] ** 0.5
        return s_dot_y > noise * torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(y, dim=1)

    def _remember(self, ok: torch.Tensor | None) -> torch.Tensor:
        """Store the pair (s, y) of the last step in the head slot where its curvature is positive,
        and return the history's inner products with [g, s, y], (B, 2m, 3)."""
        m, s, y = self.history, self.vectors[:, 1], self.vectors[:, 2]
        s_dot_y = torch.linalg.vecdot(s, y)
        accept = self.started & self._curvature_ok(s_dot_y, s, y)
        if ok is not None:
            accept &= ok
        slots = torch.cat([self.head, self.head + m])
        kept = self.pairs[self._pair_samples, slots]
        self.pairs[self._pair_samples, slots] = torch.where(accept.repeat(2)[:, None], torch.cat([s, y]), kept)
        products = _per_sample_matmul(self.pairs, self.vectors.transpose(1, 2))
        # The new pair's row and column of S'Y and Y'Y; its slot's old entries go with the old pair.
        new = (self._ages == self.head[:, None]) & accept[:, None]  # (B, m): the head slot, if accepted
        column, row, yy = products[:, :m, 2], products[:, m:, 1], products[:, m:, 2]
        self.sy.copy_(torch.where(new[:, None, :], column[:, :, None], self.sy))
        self.sy.copy_(torch.where(new[:, :, None], row[:, None, :], self.sy))
        self.yy.copy_(torch.where(new[:, None, :], yy[:, :, None], self.yy))
        self.yy.copy_(torch.where(new[:, :, None], yy[:, None, :], self.yy))
        y_dot_y = yy.gather(1, self.head[:, None])[:, 0]
        self.gamma.copy_(torch.where(accept, s_dot_y / y_dot_y, self.gamma))
        self.head.copy_(torch.where(accept, (self.head + 1) % m, self.head))
        self.count.copy_(torch.where(accept, torch.clamp(self.count + 1, max=m), self.count))
        return products

    def _direction(self, products: torch.Tensor) -> torch.Tensor:
        """-H g by the compact representation (class docstring); empty slots contribute nothing."""
        m, gamma = self.history, self.gamma[:, None, None]
        # Slots oldest first: the head slot is the oldest of a full ring; the last `count` are held.
        order = (self.head[:, None] + self._ages) % m
        held = self._ages >= (m - self.count)[:, None]
        both = held[:, :, None] & held[:, None, :]
        rows, columns = order[:, :, None].expand(-1, m, m), order[:, None, :].expand(-1, m, m)
        sy = self.sy.gather(1, rows).gather(2, columns)
        yy = torch.where(both, self.yy.gather(1, rows).gather(2, columns), 0.0)
        # Empty slots get an identity row and column in R, so u and w are 0 there.
        r = torch.where(both, sy, 0.0).triu() + torch.diag_embed((~held).to(sy.dtype))
        d = torch.where(held, sy.diagonal(dim1=1, dim2=2), 0.0)
        s_g = torch.where(held, products[:, :m, 0].gather(1, order), 0.0)[:, :, None]
        y_g = torch.where(held, products[:, m:, 0].gather(1, order), 0.0)[:, :, None]
        u = torch.linalg.solve_triangular(r, s_g, upper=True)
        # (yy * u').sum rather than yy @ u: a batched CPU matmul of these small shapes rounds a
        # sample differently with the batch size, and a sample must not depend on its batch.
        yy_u = (yy * u.mT).sum(2, keepdim=True)
        w = torch.linalg.solve_triangular(r.mT, d[:, :, None] * u + gamma * (yy_u - y_g), upper=False)
        # Back to slot order: -H g = -gamma g - S w + gamma Y u, one product over the history.
        weights = torch.zeros_like(products[:, :, 0]).scatter(
            1, torch.cat([order, order + m], 1), torch.cat([w, -gamma * u], 1)[:, :, 0])
        return -self.gamma[:, None] * self.vectors[:, 0] - _per_sample_matmul(weights[:, None, :], self.pairs)[:, 0]


class Adam:
    """Adam (Kingma & Ba) with its step count on the device; optionally projects onto [low, high].

    The update is torch.optim.Adam's default one.  Projecting after each step keeps the image a
    valid picture; unlike L-BFGS, Adam keeps no curvature pairs that a projection would corrupt.
    """

    def __init__(self, image: torch.Tensor, lr: float = 0.02, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, bounds: tuple[float, float] | None = (0.0, 1.0)):
        self.lr, self.betas, self.eps, self.bounds = float(lr), betas, float(eps), bounds
        self.exp_avg = torch.zeros_like(image, dtype=state_dtype(image))
        self.exp_avg_sq = torch.zeros_like(image, dtype=state_dtype(image))
        # The step count, and the bias corrections formed from it, in float64 as torch.optim.Adam's
        # Python floats are: in float32, 1 - 0.999**t is off by up to 1e-5 relative, and so is the step.
        self.steps = torch.zeros((), device=image.device, dtype=torch.float64)

    @property
    def state_bytes(self) -> int:
        return 2 * self.exp_avg.numel() * self.exp_avg.element_size()

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.exp_avg, self.exp_avg_sq, self.steps]

    def reset(self) -> None:
        """Back to the freshly built state (used after warm-up iterations)."""
        for t in self.state_tensors():
            t.zero_()

    @torch.no_grad()
    def update(self, image: torch.Tensor, grad: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Step ``image`` in place; ``ok`` False (fp16 overflow) leaves image and moments unchanged."""
        beta1, beta2 = self.betas
        g = grad.detach().to(self.exp_avg.dtype)
        if ok is None:
            self.steps.add_(1)
            self.exp_avg.lerp_(g, 1 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        else:
            self.steps.add_(ok.to(self.steps.dtype))
            self.exp_avg.copy_(torch.where(ok, torch.lerp(self.exp_avg, g, 1 - beta1), self.exp_avg))
            self.exp_avg_sq.copy_(torch.where(ok, self.exp_avg_sq * beta2 + g * g * (1 - beta2), self.exp_avg_sq))
        # Before the first good step the bias corrections are 0; clamping keeps 0/0 out.  Both scalars
        # are rounded to the moments' dtype once, as torch's are when they meet its tensors.
        correction1 = (1 - beta1**self.steps).clamp_(min=1e-30)
        correction2 = (1 - beta2**self.steps).clamp_(min=1e-30)
        step_size = (self.lr / correction1).to(self.exp_avg.dtype)
        denom = (self.exp_avg_sq.sqrt() / correction2.sqrt().to(self.exp_avg.dtype)).add_(self.eps)
        change = self.exp_avg * step_size / denom  # in the order torch's addcdiv_ forms it
        if ok is not None:
            change = torch.where(ok, change, 0.0)
        image.sub_(change.to(image.dtype))
        if self.bounds is not None:
            image.clamp_(*self.bounds)


class IterateAverage:
    """The exponential moving average of the iterates, bias-corrected (as Adam's moments are):
    after t updates with decay d, sum_k d^(t-k) (1 - d) x_k / (1 - d^t).  Its state lives on the
    device and ``update`` reads nothing back, so it runs inside a captured step."""

    def __init__(self, image: torch.Tensor, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the decay must be in (0, 1), not {decay}")
        self.decay = float(decay)
        self.total = torch.zeros_like(image, dtype=state_dtype(image))
        self.weight = torch.zeros((), device=image.device, dtype=state_dtype(image))  # 1 - d^t

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.total, self.weight]

    def reset(self) -> None:
        for t in self.state_tensors():
            t.zero_()

    @torch.no_grad()
    def update(self, image: torch.Tensor) -> None:
        self.total.mul_(self.decay).add_(image.detach(), alpha=1.0 - self.decay)
        self.weight.mul_(self.decay).add_(1.0 - self.decay)

    def value(self, image: torch.Tensor) -> torch.Tensor:
        """The average; ``image`` itself before the first update (chosen on the device: no sync)."""
        average = self.total / self.weight.clamp(min=torch.finfo(self.weight.dtype).tiny)
        return torch.where(self.weight > 0, average.to(image.dtype), image.detach())


def make_optimizer(name: str, image: torch.Tensor, lr: float, history: int, lbfgs_steps: str = "bounded"):
    if name == "lbfgs":
        return LBFGS(image, lr=lr, history=history, steps=lbfgs_steps)
    if name == "adam":
        return Adam(image, lr=lr)
    raise ValueError(f"unknown optimizer '{name}'")
