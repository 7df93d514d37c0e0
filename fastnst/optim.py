"""L-BFGS and Adam updates whose state lives on the image's device.

Both take the gradient at the current image and update the image in place.  Neither reads a
value back to the host: counters are device tensors, guards are ``torch.where``, and every buffer
is allocated once, so one optimisation step has fixed shapes and can later be captured in a CUDA
graph as it is.
"""

from __future__ import annotations

import torch

# Curvature pairs with s.y at or below this are skipped, as torch.optim.LBFGS does: they would
# make the inverse-Hessian estimate indefinite.
CURVATURE_EPS = 1e-10


def lbfgs_state_bytes(history: int, pixels: int, channels: int = 3) -> int:
    """fp32 bytes of L-BFGS state for an image: m (s, y) pairs plus the last step and gradient."""
    return (2 * history + 2) * channels * pixels * 4


def state_dtype(image: torch.Tensor) -> torch.dtype:
    """Optimiser state is fp32 (fp64 for an fp64 image, as in tests), whatever the image's dtype."""
    return torch.float64 if image.dtype == torch.float64 else torch.float32


class LBFGS:
    """L-BFGS for a batch of images (B, ...): every sample has its own history and step sizes.

    Samples never mix: sample b is stepped by its own ``_SampleLBFGS`` on a view of image[b], with
    the same operations whether it is rendered alone or in a batch, so a batched render gives each
    image exactly the result of rendering it alone (tests/test_batch.py).
    """

    def __init__(self, image: torch.Tensor, lr: float = 1.0, history: int = 20):
        if not image.is_contiguous():
            raise ValueError("the image must be contiguous (L-BFGS steps flat views of its samples)")
        self.history = int(history)
        self.samples = [_SampleLBFGS(image[b].numel(), image.device, state_dtype(image), lr, history)
                        for b in range(image.shape[0])]

    @property
    def state_bytes(self) -> int:
        return sum(sample.state_bytes for sample in self.samples)

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for sample in self.samples for t in sample.state_tensors()]

    def reset(self) -> None:
        for sample in self.samples:
            sample.reset()

    @torch.no_grad()
    def update(self, image: torch.Tensor, grad: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Step every sample of ``image`` in place.  ``ok`` (a device bool from fp16 loss scaling)
        False means the gradient overflowed: then nothing changes, neither images nor histories."""
        for b, sample in enumerate(self.samples):
            sample.update(image[b].view(-1), grad[b].reshape(-1), ok)


class _SampleLBFGS:
    """Limited-memory BFGS of one flat vector, fixed step (no line search), as torch.optim.LBFGS.

    Matches ``torch.optim.LBFGS(lr, history_size=m, line_search_fn=None)`` step for step: the first
    step is scaled by min(1, 1/|g|_1), later steps use ``lr``; pairs with s.y <= 1e-10 are skipped;
    the initial inverse Hessian is gamma = s.y / y.y of the newest accepted pair.  The history is a
    ring buffer of m (s, y) pairs in fp32.  Where torch would stop because the direction is not a
    descent direction, this restarts from steepest descent instead (history cleared), so a long
    run never stalls.
    """

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype, lr: float = 1.0, history: int = 20):
        self.lr, self.history = float(lr), int(history)
        self.s = torch.zeros(history, n, device=device, dtype=dtype)  # steps x_{k+1} - x_k
        self.y = torch.zeros(history, n, device=device, dtype=dtype)  # gradient changes g_{k+1} - g_k
        self.rho = torch.zeros(history, device=device, dtype=dtype)  # 1 / (s.y); 0 marks an empty slot
        self.last_step = torch.zeros(n, device=device, dtype=dtype)
        self.last_grad = torch.zeros(n, device=device, dtype=dtype)
        self.gamma = torch.ones((), device=device, dtype=dtype)  # initial inverse-Hessian scale
        self.pairs = torch.zeros((), dtype=torch.long, device=device)  # accepted pairs so far
        self.started = torch.zeros((), dtype=torch.bool, device=device)
        self._offsets = torch.arange(history, device=device)
        self._host_indexing = device.type == "cpu"  # see _newest_first

    @property
    def state_bytes(self) -> int:
        """Device memory held by the optimiser state."""
        return sum(t.numel() * t.element_size() for t in (self.s, self.y, self.last_step, self.last_grad))

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.s, self.y, self.rho, self.last_step, self.last_grad, self.gamma, self.pairs, self.started]

    def reset(self) -> None:
        """Back to the freshly built state (used after warm-up iterations)."""
        for t in (self.s, self.y, self.rho, self.last_step, self.last_grad, self.pairs):
            t.zero_()
        self.gamma.fill_(1.0)
        self.started.fill_(False)

    def update(self, flat_image: torch.Tensor, flat_grad: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """Step ``flat_image`` (a 1-D view) in place; see LBFGS.update for ``ok``."""
        g = flat_grad.detach().to(self.last_grad.dtype)
        self._remember(g, ok)
        direction = self._two_loop(g)
        bad = torch.dot(g, direction) >= 0  # not a descent direction (numerical breakdown): restart
        if ok is not None:
            bad &= ok
        direction = torch.where(bad, -g, direction)
        self.rho.masked_fill_(bad, 0.0)
        self.gamma.masked_fill_(bad, 1.0)
        fresh = ~self.started | bad
        first_step = torch.clamp(1.0 / g.abs().sum(), max=1.0) * self.lr
        step_size = torch.where(fresh, first_step, torch.full_like(first_step, self.lr))
        if ok is None:
            torch.mul(direction, step_size, out=self.last_step)
            flat_image.add_(self.last_step.to(flat_image.dtype))
            self.last_grad.copy_(g)
            self.started.fill_(True)
        else:  # where(), not multiplication by ok: an overflowed step holds inf and NaN
            step = direction * step_size
            flat_image.add_(torch.where(ok, step, 0.0).to(flat_image.dtype))
            self.last_step.copy_(torch.where(ok, step, self.last_step))
            self.last_grad.copy_(torch.where(ok, g, self.last_grad))
            self.started |= ok

    def _remember(self, g: torch.Tensor, ok: torch.Tensor | None) -> None:
        """Push the pair (s, y) of the last step into the ring, if its curvature is positive."""
        y = g - self.last_grad
        s_dot_y = torch.dot(self.last_step, y)
        accept = self.started & (s_dot_y > CURVATURE_EPS)
        if ok is not None:
            accept &= ok
        if self._host_indexing:
            if bool(accept):
                slot = int(self.pairs) % self.history
                self.s[slot].copy_(self.last_step)
                self.y[slot].copy_(y)
                self.rho[slot] = 1.0 / s_dot_y
                self.gamma.copy_(s_dot_y / torch.dot(y, y))
                self.pairs.add_(1)
            return
        slot = (self.pairs % self.history).view(1)
        self.s.index_copy_(0, slot, torch.where(accept, self.last_step, self.s.index_select(0, slot)[0]).view(1, -1))
        self.y.index_copy_(0, slot, torch.where(accept, y, self.y.index_select(0, slot)[0]).view(1, -1))
        self.rho.index_copy_(0, slot, torch.where(accept, 1.0 / s_dot_y, self.rho.index_select(0, slot)))
        self.gamma.copy_(torch.where(accept, s_dot_y / torch.dot(y, y), self.gamma))
        self.pairs.add_(accept.long())

    def _newest_first(self) -> list:
        """Ring slots from the newest pair to the oldest, as indices usable on this device.

        On the CPU reading the pair count is free, so slots are plain ints: rows are views, and
        empty slots are left out.  Elsewhere they are device tensors (no host sync, capturable),
        rows are gathered with index_select, and all m slots are visited; an empty slot has
        rho = 0 and changes nothing.  Both visit the filled slots in the same order with the same
        arithmetic, so they give the same result.
        """
        if self._host_indexing:
            head, filled = int(self.pairs), min(int(self.pairs), self.history)
            return [(head - 1 - k) % self.history for k in range(filled)]
        order = (self.pairs - 1 - self._offsets) % self.history
        return [order[k : k + 1] for k in range(self.history)]

    def _row(self, i):
        if self._host_indexing:
            return self.s[i], self.y[i], self.rho[i]
        return self.s.index_select(0, i)[0], self.y.index_select(0, i)[0], self.rho.index_select(0, i)[0]

    def _two_loop(self, g: torch.Tensor) -> torch.Tensor:
        """-H g by the two-loop recursion over the ring, newest pair first."""
        slots = self._newest_first()
        q = g.neg()
        alphas = []
        for i in slots:
            s, y, rho = self._row(i)
            alphas.append(torch.dot(s, q) * rho)
            q.addcmul_(y, alphas[-1], value=-1)
        r = q.mul_(self.gamma)
        for i, alpha in zip(reversed(slots), reversed(alphas)):
            s, y, rho = self._row(i)
            b = torch.dot(y, r) * rho
            r.addcmul_(s, alpha - b)
        return r


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
        self.steps = torch.zeros((), device=image.device, dtype=state_dtype(image))

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
        # Before the first good step the bias corrections are 0; clamping keeps 0/0 out.
        correction1 = (1 - beta1**self.steps).clamp_(min=1e-30)
        correction2 = (1 - beta2**self.steps).clamp_(min=1e-30)
        denom = (self.exp_avg_sq.sqrt() / correction2.sqrt()).add_(self.eps)
        change = self.exp_avg / denom * (self.lr / correction1)
        if ok is not None:
            change = torch.where(ok, change, 0.0)
        image.sub_(change.to(image.dtype))
        if self.bounds is not None:
            image.clamp_(*self.bounds)


def make_optimizer(name: str, image: torch.Tensor, lr: float, history: int):
    if name == "lbfgs":
        return LBFGS(image, lr=lr, history=history)
    if name == "adam":
        return Adam(image, lr=lr)
    raise ValueError(f"unknown optimizer '{name}'")
