"""Square Attack: score-based (black-box) random search with square-shaped updates.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020 (https://arxiv.org/abs/1912.00049).

The attack only queries the model's scores (``run.check``, forward passes) and never asks for
a gradient. Per point it keeps the best iterate ``x_best`` and its margin loss
``L(x_best)`` (``max_{j != y} z_j - z_y`` untargeted, ``z_t - max_{j != t} z_j`` targeted; the
attack ascends it and is done when it becomes positive) and repeats:

1. draw a square window of side ``s`` at a random position (per point), where
   ``s = round(sqrt(p * H * W))`` and ``p`` follows the paper's piecewise-constant schedule:
   ``p_init`` halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a
   10,000-query budget (the iteration numbers are rescaled to ``n_queries``);
2. L-inf: set the window to ``x +- eps`` with one random sign per channel;
   L2: move the perturbation mass of a second random window into the first one, adding the
   paper's centred "two-bump" pattern ``eta`` with random signs, and rescale to norm ``eps``;
3. query the candidate and accept it only if its margin loss is higher than the best so far.

Initialisation: L-inf, vertical stripes ``x + eps * sign`` with one random sign per column and
channel; L2, a 5x5 grid of ``eta`` patterns with random signs, rescaled to norm ``eps``.

``n_queries`` counts every query of one restart, the initial one included (as in the paper's
reference code: one initial query and ``n_queries - 1`` updates). Per-sample square positions
and signs follow the paper (AutoAttack's port draws one position for the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bastion.attacks import losses
from bastion.attacks.base import Attack, AttackRun, LossFn, flat_norm
from bastion.attacks.registry import register
from bastion.errors import ConfigError

#: iterations (of a 10,000-query budget) after which ``p`` is halved (Andriushchenko et al.)
P_SCHEDULE: tuple[int, ...] = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels the square covers at iteration ``it`` (0-based) of ``n_queries``:
    ``p_init / 2**k`` with ``k`` the number of schedule points ``< it * 10000 / n_queries``."""
    it = int(it / n_queries * 10000)
    halvings = sum(1 for t in P_SCHEDULE if it > t)
    return p_init / 2**halvings


def eta_rectangle(h1: int, h2: int, *, device: torch.device | None = None) -> torch.Tensor:
    """``(h1, h2)`` centred bump of the L2 attack (Andriushchenko et al., Sec. 3.2):
    pixel at Chebyshev distance ``d`` from the centre ``(h1 // 2, h2 // 2)`` gets
    ``sum_{k=d}^{n} 1 / (k + 1)^2`` with ``n = max(h1, h2) // 2``."""
    r = torch.arange(h1, device=device, dtype=torch.float64)[:, None] - h1 // 2
    c = torch.arange(h2, device=device, dtype=torch.float64)[None, :] - h2 // 2
    d = torch.maximum(r.abs(), c.abs()).long()
    n = max(h1, h2) // 2
    terms = 1.0 / (torch.arange(n + 1, device=device, dtype=torch.float64) + 1) ** 2
    tail = terms.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{j >= k} terms[j]
    return tail[d.clamp(max=n)].float()


def eta_pattern(s: int, *, device: torch.device | None = None) -> torch.Tensor:
    """``(s, s)`` L2 update pattern: a positive bump on the top half, a negative one on the
    bottom half, unit L2 norm (Andriushchenko et al., Sec. 3.2)."""
    top = eta_rectangle(s // 2, s, device=device) if s // 2 > 0 else torch.zeros(0, s, device=device)
    bottom = -eta_rectangle(s - s // 2, s, device=device)
    pat = torch.cat([top, bottom], dim=0)
    return pat / pat.norm().clamp_min(1e-12)


def _window(
    n: int, h: int, w: int, s: int, vh: torch.Tensor, vw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``s x s`` window at rows ``vh`` and columns ``vw`` (each ``(n,)``): returns the
    ``(n, 1, h, w)`` bool mask and the ``(n, h, 1)``, ``(n, 1, w)`` local coordinates (clamped
    into ``[0, s)``) for placing an ``(s, s)`` pattern."""
    dev = vh.device
    rr = torch.arange(h, device=dev)[None, :] - vh[:, None]  # (n, h)
    cc = torch.arange(w, device=dev)[None, :] - vw[:, None]  # (n, w)
    in_r = (rr >= 0) & (rr < s)
    in_c = (cc >= 0) & (cc < s)
    mask = (in_r[:, :, None] & in_c[:, None, :])[:, None]
    return mask, rr.clamp(0, s - 1)[:, :, None], cc.clamp(0, s - 1)[:, None, :]


@register("square", summary="Square Attack (Andriushchenko et al. 2020), score-based random search")
@dataclass(frozen=True)
class Square(Attack):
    """Square Attack (score-based; uses forward queries only).

    Args:
        n_queries: queries per point and restart, the initial one included.
        p_init: initial fraction of the image the square covers (schedule above).
        restarts: independent runs from a new random initialisation, on points not yet broken.

    Cost: at most ``restarts * (n_queries + 1)`` forward evaluations per point (the extra one
    hands the best iterate of a failed restart back to the engine), no gradients.
    """

    norms = ("linf", "l2")
    gradient_free = True

    n_queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1

    def validate(self) -> None:
        for field, value in (("n_queries", self.n_queries), ("restarts", self.restarts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field}={value!r} must be an integer >= 1")
        p = self.p_init
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise ConfigError(f"p_init={p!r} must be a number in (0, 1]")
        if self.eot_samples != 1:
            raise ConfigError(f"eot_samples={self.eot_samples!r} must be 1: square uses no gradients")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _loss(run: AttackRun) -> LossFn:
        """The margin loss the attack ascends (positive once the criterion holds)."""
        return losses.margin_targeted if run.targeted else losses.margin

    def _signs(self, run: AttackRun, *shape: int) -> torch.Tensor:
        u = run.uniform(run.x.new_empty(shape), 0.0, 1.0)
        return (u >= 0.5).to(u.dtype) * 2 - 1  # -1 where u < 0.5, else +1

    def _ints(self, run: AttackRun, n: int, high: int) -> torch.Tensor:
        """``(n,)`` integers uniform in ``{0, ..., high}``."""
        u = run.uniform(run.x.new_empty(n), 0.0, 1.0)
        return (u * (high + 1)).long().clamp(0, high)

    def _rescale_l2(self, delta: torch.Tensor) -> torch.Tensor:
        n = flat_norm(delta, "l2").view(-1, *([1] * (delta.dim() - 1)))
        return delta / (n + 1e-12) * self.eps

    def _init(self, run: AttackRun) -> torch.Tensor:
        x = run.x
        n, c, h, w = x.shape
        lo, hi = run.bounds
        if self.norm == "linf":
            return (x + self.eps * self._signs(run, n, c, 1, w)).clamp(lo, hi)
        s = max(min(h, w) // 5, 1)
        pat = eta_pattern(s, device=x.device)
        delta = torch.zeros_like(x)
        rows, cols = h // s, w // s
        r0, c0 = (h - s * rows) // 2, (w - s * cols) // 2
        for i in range(rows):
            for j in range(cols):
                flip = self._ints(run, n, 1).bool().view(n, 1, 1, 1)
                p = torch.where(flip, pat.t().expand(n, 1, s, s), pat.expand(n, 1, s, s))
                sl = (
                    slice(None),
                    slice(None),
                    slice(r0 + i * s, r0 + (i + 1) * s),
                    slice(c0 + j * s, c0 + (j + 1) * s),
                )
                delta[sl] = p * self._signs(run, n, c, 1, 1)
        return (x + self._rescale_l2(delta)).clamp(lo, hi)

    def _candidate_linf(self, run: AttackRun, x_best: torch.Tensor, s: int) -> torch.Tensor:
        x = run.x
        n, c, h, w = x.shape
        vh, vw = self._ints(run, n, h - s), self._ints(run, n, w - s)
        mask, _, _ = _window(n, h, w, s, vh, vw)
        square = x + self.eps * self._signs(run, n, c, 1, 1)
        return torch.where(mask, square, x_best).clamp(*run.bounds)

    def _candidate_l2(self, run: AttackRun, x_best: torch.Tensor, s: int) -> torch.Tensor:
        x = run.x
        n, c, h, w = x.shape
        delta = x_best - x
        vh, vw = self._ints(run, n, h - s), self._ints(run, n, w - s)
        vh2, vw2 = self._ints(run, n, h - s), self._ints(run, n, w - s)
        m1, rr, cc = _window(n, h, w, s, vh, vw)
        m2, _, _ = _window(n, h, w, s, vh2, vw2)
        # the eta pattern placed on window 1, transposed for a random half of the points
        pat = eta_pattern(s, device=x.device)
        flip = self._ints(run, n, 1).bool()[:, None, None]
        placed = torch.where(flip, pat.t()[rr, cc], pat[rr, cc])[:, None] * m1  # (n, 1, h, w)
        d_w1 = delta * m1
        norm_w1 = d_w1.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()  # per channel
        norm_img = flat_norm(delta, "l2").view(n, 1, 1, 1)
        norm_union = flat_norm(delta * (m1 | m2), "l2").view(n, 1, 1, 1)
        new = placed * self._signs(run, n, c, 1, 1) + d_w1 / (norm_w1 + 1e-12)
        new_norm = new.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
        avail = ((self.eps**2 - norm_img**2).clamp_min(0) / c + norm_union**2).sqrt()
        new = new / (new_norm + 1e-12) * avail
        delta = torch.where(m1, new, torch.where(m2, torch.zeros_like(delta), delta))
        return (x + self._rescale_l2(delta)).clamp(*run.bounds)

    def _side(self, it: int, n_features: int, h: int, w: int) -> int:
        p = p_selection(self.p_init, it, self.n_queries)
        s = round(math.sqrt(p * n_features))
        if self.norm == "linf":
            return min(max(s, 1), h, w)
        s = min(max(s, 3), h, w)
        if s % 2 == 0:
            s = s + 1 if s + 1 <= min(h, w) else s - 1
        return max(s, 1)

    # ------------------------------------------------------------------ the algorithm
    def _run(self, run: AttackRun) -> None:
        loss = self._loss(run)
        _, _, h, w = run.x.shape
        for _ in range(self.restarts):
            run.prune()
            if run.done:
                return
            x_best = self._init(run)
            logits = run.check(x_best)
            best = loss(logits, run.labels)
            fooled = run.criterion(logits)
            for it in range(self.n_queries - 1):
                x_best, best, fooled = run.prune(x_best, best, fooled, keep=~fooled)
                if run.done:
                    return
                s = self._side(it, h * w, h, w)
                propose = self._candidate_linf if self.norm == "linf" else self._candidate_l2
                # projected once: check() takes the tensor project() just returned as it is
                cand = run.project(propose(run, x_best, s))
                logits = run.check(cand)
                new = loss(logits, run.labels)
                ok = run.criterion(logits)
                better = (new > best) | ok
                x_best = torch.where(better.view(-1, 1, 1, 1), cand, x_best)
                best = torch.where(better, new, best)
                fooled = fooled | ok
            # hand the best iterate (not the last rejected candidate) back to the engine
            x_best, best, fooled = run.prune(x_best, best, fooled, keep=~fooled)
            if run.done:
                return
            run.check(x_best)
