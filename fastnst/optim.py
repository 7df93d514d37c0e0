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


def state_dtype(image: torch.Tensor) -> torch.dtype:
    """Optimiser state is fp32 (fp64 for an fp64 image, as in tests), whatever the image's dtype."""
    return torch.float64 if image.dtype == torch.float64 else torch.float32


class LBFGS:
    """Limited-memory BFGS with a fixed step (no line search), as in torch.optim.LBFGS.

    Matches ``torch.optim.LBFGS(lr, history_size=m, line_search_fn=None)`` step for step: the first
    step is scaled by min(1, 1/|g|_1), later steps use ``lr``; pairs with s.y <= 1e-10 are skipped;
    the initial inverse Hessian is gamma = s.y / y.y of the newest accepted pair.  The history is a
    ring buffer of m (s, y) pairs in fp32.  Where torch would stop because the direction is not a
    descent direction, this restarts from steepest descent instead (history cleared), so a long
    run never stalls.
    """

    def __init__(self, image: torch.Tensor, lr: float = 1.0, history: int = 20):
        n, device, dtype = image.numel(), image.device, state_dtype(image)
        self.lr, self.history = float(lr), int(history)
        self.s = torch.zeros(history, n, device=device, dtype=dtype)  # steps x_{k+1} - x_k
        self.y = torch.zeros(history, n, device=device, dtype=dtype)  # gradient changes g_{k+1} - g_k
        self.rho = torch.zeros(history, device=device, dtype=dtype)  # 1 / (s.y); 0 marks an empty slot
        self.alpha = torch.zeros(history, device=device, dtype=dtype)
        self.last_step = torch.zeros(n, device=device, dtype=dtype)
        self.last_grad = torch.zeros(n, device=device, dtype=dtype)
        self.gamma = torch.ones((), device=device, dtype=dtype)  # initial inverse-Hessian scale
        self.pairs = torch.zeros((), dtype=torch.long, device=device)  # accepted pairs so far
        self.started = torch.zeros((), dtype=torch.bool, device=device)
        self._offsets = torch.arange(history, device=device)

    @property
    def state_bytes(self) -> int:
        """Device memory held by the optimiser state."""
        return sum(t.numel() * t.element_size() for t in (self.s, self.y, self.last_step, self.last_grad))

    @torch.no_grad()
    def update(self, image: torch.Tensor, grad: torch.Tensor) -> None:
        g = grad.detach().reshape(-1).to(self.last_grad.dtype)
        self._remember(g)
        direction = self._two_loop(g)
        g_dot_d = torch.dot(g, direction)
        bad = g_dot_d >= 0  # not a descent direction (numerical breakdown): restart
        direction = torch.where(bad, -g, direction)
        self.rho.masked_fill_(bad, 0.0)
        self.gamma.masked_fill_(bad, 1.0)
        fresh = ~self.started | bad
        first_step = torch.clamp(1.0 / g.abs().sum(), max=1.0) * self.lr
        step_size = torch.where(fresh, first_step, torch.full_like(first_step, self.lr))
        torch.mul(direction, step_size, out=self.last_step)
        image.view(-1).add_(self.last_step.view_as(image.view(-1)).to(image.dtype))
        self.last_grad.copy_(g)
        self.started.fill_(True)

    def _remember(self, g: torch.Tensor) -> None:
        """Push the pair (s, y) of the last step into the ring, if its curvature is positive."""
        y = g - self.last_grad
        s_dot_y = torch.dot(self.last_step, y)
        accept = self.started & (s_dot_y > CURVATURE_EPS)
        slot = (self.pairs % self.history).view(1)
        self.s.index_copy_(0, slot, torch.where(accept, self.last_step, self.s.index_select(0, slot)[0]).view(1, -1))
        self.y.index_copy_(0, slot, torch.where(accept, y, self.y.index_select(0, slot)[0]).view(1, -1))
        self.rho.index_copy_(0, slot, torch.where(accept, 1.0 / s_dot_y, self.rho.index_select(0, slot)))
        self.gamma.copy_(torch.where(accept, s_dot_y / torch.dot(y, y), self.gamma))
        self.pairs.add_(accept.long())

    def _two_loop(self, g: torch.Tensor) -> torch.Tensor:
        """-H g by the two-loop recursion over the ring, newest pair first; empty slots are no-ops."""
        newest_first = (self.pairs - 1 - self._offsets) % self.history
        q = g.neg()
        for k in range(self.history):
            i = newest_first[k : k + 1]
            s, y, rho = self.s.index_select(0, i)[0], self.y.index_select(0, i)[0], self.rho.index_select(0, i)
            a = torch.dot(s, q) * rho[0]
            self.alpha[k] = a
            q.addcmul_(y, a, value=-1)
        r = q.mul_(self.gamma)
        for k in reversed(range(self.history)):
            i = newest_first[k : k + 1]
            s, y, rho = self.s.index_select(0, i)[0], self.y.index_select(0, i)[0], self.rho.index_select(0, i)
            b = torch.dot(y, r) * rho[0]
            r.addcmul_(s, self.alpha[k] - b)
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

    @torch.no_grad()
    def update(self, image: torch.Tensor, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        g = grad.detach().to(self.exp_avg.dtype)
        self.steps.add_(1)
        self.exp_avg.lerp_(g, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        correction1 = 1 - beta1**self.steps
        correction2 = 1 - beta2**self.steps
        denom = (self.exp_avg_sq.sqrt() / correction2.sqrt()).add_(self.eps)
        image.sub_((self.exp_avg / denom * (self.lr / correction1)).to(image.dtype))
        if self.bounds is not None:
            image.clamp_(*self.bounds)


def make_optimizer(name: str, image: torch.Tensor, lr: float, history: int):
    if name == "lbfgs":
        return LBFGS(image, lr=lr, history=history)
    if name == "adam":
        return Adam(image, lr=lr)
    raise ValueError(f"unknown optimizer '{name}'")
