"""The exact velocity of the checkerboard under an affine path from N(0, I): a model with no learning error.

The checkerboard (``fastfm.data.toys.checkerboard``) is uniform on 8 squares of side 2 in [-4, 4]^2. Given
x_t = alpha x1 + sigma x0 = x, the posterior of x1 on a square is a product over coordinates of N(x / alpha,
(sigma / alpha)^2) truncated to the square's side [a, b]. In w = (alpha u - x) / sigma the side is [w_a, w_b] and

    mass  Z = Phi(w_b) - Phi(w_a)   (over alpha, a factor every square shares)
    mean  E[u] = (x + sigma E[w]) / alpha,   E[w] = (phi(w_a) - phi(w_b)) / Z

E[x1 | x_t] mixes the squares' means by their masses, E[x0 | x_t] = (x - alpha E[x1 | x_t]) / sigma, and the
velocity is alpha' E[x1 | x_t] + sigma' E[x0 | x_t]. Computed in float64, alpha clamped at ALPHA_MIN: at t = 0
the posterior is the prior, and the clamp moves its mean by about ALPHA_MIN Var(x1) |x| (Var(x1) = 16/3 per
coordinate), while (x + sigma E[w]) / alpha loses about 1e-16 |x| / ALPHA_MIN^2 to cancellation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastfm.path.affine import AffinePath

SIDE = 2.0
CORNERS = [(SIDE * i, SIDE * j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
"""Lower-left corners of the checkerboard's squares: floor(x / 2) + floor(y / 2) even."""
ALPHA_MIN = 1e-5


def _log_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, in the tail where it is accurate (reflected when lo > 0)."""
    flip = lo > 0
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))


def posterior_x1(x: Tensor, alpha: Tensor, sigma: Tensor, corners: Tensor) -> Tensor:
    """E[x1 | alpha x1 + sigma x0 = x] for x (B, 2), alpha and sigma (B, 1) > 0, squares' corners (K, 2)."""
    a = corners.to(x.dtype)
    alpha = alpha.clamp_min(ALPHA_MIN)[:, None]  # (B, 1, 1)
    sigma, x = sigma[:, None], x[:, None]
    w_a, w_b = (alpha * a - x) / sigma, (alpha * (a + SIDE) - x) / sigma  # (B, K, 2)
    log_z = _log_mass(w_a, w_b)
    log_phi = lambda w: -0.5 * w * w - 0.5 * math.log(2 * math.pi)  # noqa: E731
    mean_w = torch.exp(log_phi(w_a) - log_z) - torch.exp(log_phi(w_b) - log_z)
    means = (x + sigma * mean_w) / alpha  # (B, K, 2)
    weights = torch.softmax(log_z.sum(-1), dim=1)[..., None]
    return (weights * means).sum(1)


class CheckerboardVelocity(nn.Module):
    """The exact velocity field of ``path`` (Gaussian base N(0, I)) to the checkerboard: model(x, t) -> v, for
    t < 1 (sigma_t > 0). The squares' corners are its one (frozen) parameter, which gives samplers its device."""

    def __init__(self, path: AffinePath) -> None:
        super().__init__()
        self.path = path
        self.corners = nn.Parameter(torch.tensor(CORNERS), requires_grad=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.path.scheduler(t.double())
        alpha, sigma, d_alpha, d_sigma = (v[:, None] for v in (s.alpha_t, s.sigma_t, s.d_alpha_t, s.d_sigma_t))
        xd = x.double()
        x1 = posterior_x1(xd, alpha, sigma, self.corners)
        x0 = (xd - alpha * x1) / sigma
        return (d_alpha * x1 + d_sigma * x0).to(x.dtype)
