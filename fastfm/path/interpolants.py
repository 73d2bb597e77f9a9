"""Learned interpolants (Albergo & Vanden-Eijnden 2022, Sec. 2.4): the path itself is optimised to shorten transport.

The learned path is registered in fastfm.path.affine like every path (``--path learned --path-args modes=4 lr=2e-3
every=1``): a :class:`~fastfm.path.affine.FourierInterpolant` x_t = sigma(t) x0 + alpha(t) x1 whose sine coefficients
this module's objective trains. (The paper's optional gamma(t) z term is left out: it is not an affine path of
(x0, x1), and with a Gaussian source it adds nothing an affine path lacks.)

Max-min training: for a fixed interpolant I the velocity minimises

    G(v) = E_{t ~ U[0, 1], x0, x1} [ |v(x_t, t)|^2 - 2 d_t I_t . v(x_t, t) ]       (d_t I_t = sigma' x0 + alpha' x1)

which is the CFM loss E|v - d_t I_t|^2 less the v-independent E|d_t I_t|^2. Its minimiser is the marginal velocity
v*_t(x) = E[d_t I_t | x_t = x], and min_v G = -int_0^1 E|v*_t|^2 dt is minus the flow's kinetic energy; the
interpolant's parameters *maximise* min_v G, so they minimise the kinetic energy (never below W2^2(p0, p1)).
By the envelope theorem the gradient of min_v G in (a, b) is that of G at the current v, with v held fixed,
flowing through x_t and d_t I_t (:func:`interpolant_objective`).

The fused path and loss kernels are not differentiable in their coefficients, so the objective is computed here
in plain PyTorch; the velocity's own steps keep using the kernels with the (detached) coefficients of
:class:`~fastfm.path.affine.LearnedScheduler`.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastfm.path.affine import FourierInterpolant, expand_like


def interpolant_objective(model: nn.Module, interpolant: FourierInterpolant, x0: Tensor, x1: Tensor, t: Tensor,
                          **conditioning: Tensor) -> Tensor:
    """G = mean_i [ |v(x_t, t)|^2 - 2 d_t I_t . v(x_t, t) ]_i (sums over the data dimensions), x_t and d_t I_t from
    ``interpolant`` at t, in plain PyTorch: differentiable in the interpolant's parameters (and the model's)."""
    if x0.shape != x1.shape or t.shape != x1.shape[:1]:
        raise ValueError(f"need x0, x1 of one shape (B, ...) and t of shape (B,); got {tuple(x0.shape)}, "
                         f"{tuple(x1.shape)}, {tuple(t.shape)}")
    s = interpolant(t.float())
    x_t = expand_like(s.sigma_t, x1) * x0 + expand_like(s.alpha_t, x1) * x1
    d_i = expand_like(s.d_sigma_t, x1) * x0 + expand_like(s.d_alpha_t, x1) * x1
    v = model(x_t.to(x1.dtype), t, **conditioning).float()
    return (v * v - 2 * d_i * v).flatten(1).sum(1).mean()
