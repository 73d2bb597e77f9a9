"""Transport diagnostics of a flow dx/dt = v(x, t) from x(0) ~ p0: kinetic energy, straightness, exact W2^2.

    kinetic energy   K = int_0^1 E|v_t(X_t)|^2 dt                         (Benamou-Brenier action)
    straightness     S = E int_0^1 |v_t(X_t) - (X_1 - X_0)|^2 dt           (Liu et al. 2022; 0 iff straight)
    exact OT cost    W2^2(p0, p1) = min_pi E_pi |X - Y|^2                  (K >= W2^2(law X_0, law X_1))

K and S come from the ODE solve itself: the state is augmented with e(t), de/dt = |v(x, t)|^2 per sample,
so e(1) is integrated by the solver's own quadrature (for a Runge-Kutta tableau (c, A, b) each step adds
h sum_i b_i |k_i|^2 over the stage velocities k_i: left rectangle for Euler, midpoint rule for midpoint,
trapezoid for Heun, Simpson for RK4), which converges to the exact integral as the steps grow. Because
the solver's update x_{n+1} - x_n = h sum_i b_i k_i is the same quadrature of v, and sum_i b_i = 1,
    S = K - E|X_1 - X_0|^2 / (t1 - t0)
holds exactly for the discrete solve too (on an interval [t0, t1]: the deviation from the constant
velocity (X_{t1} - X_{t0}) / (t1 - t0)). Each per-sample term is >= 0 by Cauchy-Schwarz (b_i >= 0).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastfm import seeding
from fastfm.solve.solvers import Field

if TYPE_CHECKING:
    from fastfm.path.affine import AffinePath

W2_MAX_POINTS = 10_000
"""Largest sample set per side ``w2_squared`` takes unless told otherwise: the exact network-simplex LP is
about O(n^3) (5k x 5k takes ~10 s on two cores, 10k x 10k minutes) and its cost matrix n^2 x 8 bytes."""


def speed_squared(v: Tensor) -> Tensor:
    """|v|^2 per sample, summed over all non-batch dimensions, in at least fp32: shape (B,)."""
    return v.flatten(1).to(torch.promote_types(v.dtype, torch.float32)).pow(2).sum(1)


def with_kinetic(f: Field) -> Field:
    """The field f over state s, augmented with the kinetic integrand: d/dt (s, e) = (f(t, s), |v|^2), v the
    first component of f (the velocity of x). A tensor state s becomes (x, e), a tuple (x, l) becomes (x, l, e)."""
    def g(t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        inner = state[:-1]
        out = f(t, inner[0] if len(inner) == 1 else tuple(inner))
        v = out if isinstance(out, Tensor) else out[0]
        return (out, speed_squared(v)) if isinstance(out, Tensor) else (*out, speed_squared(v))
    return g


def kinetic_start(x0: Tensor) -> Tensor:
    """e(t0) = 0 per sample, in the dtype ``speed_squared`` gives for x0's dtype."""
    return torch.zeros(x0.shape[0], dtype=torch.promote_types(x0.dtype, torch.float32), device=x0.device)


def straightness(kinetic: Tensor, x0: Tensor, x1: Tensor, duration: float = 1.0) -> Tensor:
    """Per-sample S_i = int |v - (x1 - x0) / T|^2 dt = K_i - |x1 - x0|^2 / T over an interval of length T, from
    the per-sample kinetic integrals K_i of the same solve (exact for its quadrature, see the module text);
    rounding below 0 is clipped."""
    if not duration > 0:
        raise ValueError(f"the time interval must have positive length, got {duration}")
    return (kinetic - speed_squared(x1 - x0) / duration).clamp_min(0.0)


def _mean_and_stderr(x: Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def transport_summary(kinetic: Tensor, straight: Tensor) -> dict[str, float | int]:
    """Means over trajectories (with standard errors) of per-sample kinetic energies and straightness."""
    if kinetic.shape != straight.shape or kinetic.dim() != 1 or len(kinetic) == 0:
        raise ValueError(f"need per-sample kinetic energies and straightness of one shape (n,), got "
                         f"{tuple(kinetic.shape)} and {tuple(straight.shape)}")
    k, k_se = _mean_and_stderr(kinetic)
    s, s_se = _mean_and_stderr(straight)
    return {"kinetic_energy": k, "kinetic_energy_stderr": k_se, "straightness": s, "straightness_stderr": s_se,
            "n": len(kinetic)}


def w2_squared(x: Tensor, y: Tensor, max_points: int | None = W2_MAX_POINTS) -> float:
    """Exact squared 2-Wasserstein distance between the empirical measures of x (n, d) and y (m, d):

        W2^2 = min_{pi in Pi(1/n, 1/m)} sum_ij pi_ij |x_i - y_j|^2

    by POT's network simplex (``ot.emd2``, squared-Euclidean cost, float64). Rows are flattened. Sets of more
    than ``max_points`` rows per side are refused (the LP's time and n x m memory; None: no limit)."""
    import ot

    xs, ys = (torch.as_tensor(z) for z in (x, y))
    for name, z in (("x", xs), ("y", ys)):
        if z.dim() < 2 or z.shape[0] < 1:
            raise ValueError(f"{name} must be a batch of samples (n, d...) with n >= 1, got shape {tuple(z.shape)}")
        if max_points is not None and z.shape[0] > max_points:
            raise ValueError(f"{name} has {z.shape[0]} samples: the exact OT LP is too slow above {max_points} "
                             "per side; subsample, or pass max_points=None to run it anyway")
    a, b = (z.detach().flatten(1).double().cpu().numpy() for z in (xs, ys))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample dimensions differ: x has {a.shape[1]}, y has {b.shape[1]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("samples contain non-finite values (NaN or inf)")
    cost = ot.dist(a, b, metric="sqeuclidean")
    n, m = cost.shape
    value, log = ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost, numItermax=max(100_000, 50 * n * m),
                         log=True)
    if log.get("warning"):
        raise ValueError(f"exact OT did not converge: {log['warning']}")
    return float(value)



def transport_report(res: Any, path: AffinePath, reference: Tensor | None = None, *, w2_points: int,
                     seed: int = 0) -> dict[str, Any]:
    """The "transport" block of an evaluation: kinetic energy and straightness (means over the trajectories of
    the solve that made ``res``, a ``SampleResult`` of a solve with ``transport=True``) and, given reference
    data (vectors), POT's exact W2^2 between ``w2_points`` prior draws (the stream ``seeding.TRANSPORT`` of
    ``seed``, apart from the sampler's draws) and as many reference points: the least kinetic energy any flow
    from the prior to the data can have (Benamou-Brenier), up to sampling error."""
    if res.kinetic is None or res.straightness is None:
        raise ValueError("transport_report needs samples generated with transport=True")
    out: dict[str, Any] = transport_summary(res.kinetic, res.straightness)
    if reference is not None:
        n = min(w2_points, len(reference))
        x0 = path.prior.sample((n, *reference.shape[1:]), generator=seeding.generator(seed, seeding.TRANSPORT))
        out["w2_sq_pot"] = w2_squared(x0, reference[:n])
        out["w2_n"] = n
    return out
