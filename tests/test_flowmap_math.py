"""Flow maps against a closed form: N(0, I) -> N(mu, sig^2 I) under the linear interpolant x_t = (1 - t) x0 + t x1
has the marginal x_t ~ N(t mu, s_t^2 I), s_t = sqrt((1 - t)^2 + t^2 sig^2), and the affine flow map
X_{s->t}(x) = t mu + (s_t / s_s)(x - s mu). Against it: the MeanFlow identity and the MeanFlow objective's target
(read off its losses), the shortcut objective's self-consistency, the flow-map sampler, the objectives' time draws,
their argument and config errors, and training with them (compiled = eager, resume, DDP)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from fastfm import train
from fastfm.kernels.rng import philox_state
from fastfm.models import MLP, UNet
from fastfm.path.affine import get_path
from fastfm.solve.flowmap import flow_map_sample
from fastfm.training.objectives import MeanFlow, Shortcut, path_point
from fastfm.training.timesteps import get_time_sampler
from fastfm.training.config import TrainConfig
from fastfm.training.trainer import LossStep, channels_last

from conftest import cli_error, train_argv
from test_models import perturb_
from test_operators import DROPOUT, _same_weights, _train
from test_train_engine import _max_diff, _one, _torchrun

PATH = get_path("condot", sigma_min=0.0)  # x_t = (1 - t) x0 + t x1, conditional velocity x1 - x0
MU = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
SIG = 0.5
DIM, BATCH = 3, 37


class GaussianMap(nn.Module):
    """The exact average velocity of the flow N(0, I) -> N(mu, sig^2 I) (module doc), safe at h = 0:

        u(x, t, t + h) = (X_{t->t+h}(x) - x) / h = mu + k(t, h) (x - t mu),
        k = (s_{t+h} - s_t) / (h s_t) = ((1 + sig^2)(2t + h) - 2) / (s_t (s_t + s_{t+h}))

    (s_{t+h}^2 - s_t^2 = h ((1 + sig^2)(2t + h) - 2)); k(t, 0) = s_t' / s_t: the marginal velocity."""

    def __init__(self, mu: Tensor = MU, sig: float = SIG) -> None:
        super().__init__()
        self.mu, self.sig = mu, sig

    def std(self, t: Tensor) -> Tensor:
        return torch.sqrt((1 - t) ** 2 + (t * self.sig) ** 2)

    def flow(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """X_{s->t}(x)."""
        mu = self.mu.to(x.dtype)
        return t[:, None] * mu + (self.std(t) / self.std(s))[:, None] * (x - s[:, None] * mu)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        h = torch.zeros_like(t) if h is None else h
        k = ((1 + self.sig**2) * (2 * t + h) - 2) / (self.std(t) * (self.std(t) + self.std(t + h)))
        mu = self.mu.to(x.dtype)
        return mu + k[:, None].to(x.dtype) * (x - t[:, None].to(x.dtype) * mu)


class Smooth(nn.Module):
    """A nonlinear model of two times whose derivatives in x, t and h all differ from 0 and from one another:
    u = tanh(x W + t a + h b + t h c) (1 + t - h^2)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
        self.a, self.b, self.c = torch.randn(3, DIM, generator=g, dtype=torch.float64)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        h = torch.zeros_like(t) if h is None else h
        t, h = t[:, None], h[:, None]
        return torch.tanh(x @ self.w + t * self.a + h * self.b + t * h * self.c) * (1 + t - h**2)


class Shifted(nn.Module):
    """``model`` plus a constant vector: the same derivatives, hence the same MeanFlow target."""

    def __init__(self, model: nn.Module, shift: Tensor) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        return self.model(x, t, y, h) + self.shift


def meanflow_target(model: nn.Module, x0: Tensor, x1: Tensor, s: Tensor, h: Tensor) -> Tensor:
    """``MeanFlow.per_sample``'s regression target u_tgt per row, read off its losses: with power 0 the loss of the
    model shifted by c is |u + c - u_tgt|^2, so (L(e_i) - L(-e_i)) / 4 = (u - u_tgt)_i. fp32, like the objective."""
    objective = MeanFlow(power=0.0)
    x, _ = path_point(PATH, x0, x1, s, None)

    def loss(shift: Tensor) -> Tensor:
        return objective.per_sample(Shifted(model, shift), PATH, x0, x1, s, h, None, "velocity", "squared", {})

    eye = torch.eye(DIM, dtype=x0.dtype)
    delta = torch.stack([(loss(e) - loss(-e)) / 4 for e in eye], dim=1)
    return model(x, s, h=h).float() - delta


def _times(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(s, h) in float64, fp32-exact, with s + h <= 1 and h > 0."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, generator=g), torch.rand(n, generator=g)
    s, t = torch.minimum(a, b).double(), torch.maximum(a, b).double()
    return s, (t - s).float().double()


def _pairs(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return x0, MU + SIG * torch.randn(n, DIM, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The reference and the MeanFlow identity
# ---------------------------------------------------------------------------------------------


def test_reference_is_the_average_velocity_of_its_flow_map() -> None:
    """float64: u(x, s, h) = (X_{s->s+h}(x) - x) / h, and u(x, s, 0) = d/dt X_{s->t}(x) at t = s."""
    model, (s, h) = GaussianMap(), _times(BATCH, 1)
    x = _pairs(BATCH, 2)[0]
    assert torch.allclose(model(x, s, h=h), (model.flow(x, s, s + h) - x) / h[:, None], rtol=1e-9, atol=1e-9)
    _, dflow = torch.func.jvp(lambda t: model.flow(x, s, t), (s,), (torch.ones_like(s),))
    assert torch.allclose(model(x, s), dflow, rtol=1e-12, atol=1e-12)
    assert torch.equal(model(x, s), model(x, s, h=torch.zeros_like(s)))


def test_meanflow_identity_with_the_marginal_velocity() -> None:
    """v + h (v . grad_x u + d_s u - d_h u) = u(x, s, s + h) to float64 rounding: the objective's loss is zero
    at the exact map when v is the marginal velocity."""
    model, (s, h) = GaussianMap(), _times(BATCH, 3)
    x = _pairs(BATCH, 4)[0]
    v = model(x, s)
    u, du = torch.func.jvp(lambda x, s, h: model(x, s, h=h), (x, s, h), (v, torch.ones_like(s), -torch.ones_like(h)))
    assert (u - v).abs().max() > 0.05  # the map is not the velocity: the identity has something to do
    assert torch.allclose(v + h[:, None] * du, u, rtol=1e-12, atol=1e-12)


def test_meanflow_target_is_v_plus_h_times_the_derivative_along_the_flow() -> None:
    """per_sample's target = v + h d/ds' u(x + (s' - s) v, s', t) at s' = s with the end time t fixed (h = t - s'
    shrinking), v = x1 - x0; the derivative by a float64 central difference (error ~1e-10), the target in fp32."""
    model, (s, h) = Smooth(), _times(BATCH, 5)
    x0, x1 = _pairs(BATCH, 6)
    x, v = path_point(PATH, x0, x1, s, None)
    eps = 1e-5

    def moved(e: float) -> Tensor:
        return model(x + e * v, s + e, h=h - e)

    reference = v + h[:, None] * (moved(eps) - moved(-eps)) / (2 * eps)
    target = meanflow_target(model, x0, x1, s, h)
    assert torch.allclose(target.double(), reference, rtol=1e-5, atol=1e-5)
    assert (reference - v).abs().max() > 0.1  # the derivative term matters


def _posterior_pairs(x_s: Tensor, s: float, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """n draws of (x0, x1) given (1 - s) x0 + s x1 = x_s: x0 | x_s ~ N((1 - s)(x_s - s mu) / S^2, s^2 sig^2 / S^2),
    S^2 = (1 - s)^2 + s^2 sig^2, then x1 = (x_s - (1 - s) x0) / s."""
    var = (1 - s) ** 2 + (s * SIG) ** 2
    mean = (1 - s) * (x_s - s * MU) / var
    x0 = mean + (s * SIG / math.sqrt(var)) * torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    return x0, (x_s - (1 - s) * x0) / s


@pytest.mark.parametrize(("s", "h"), [(0.25, 0.5), (0.5, 0.375), (0.125, 0.875)])
def test_meanflow_target_is_unbiased_for_the_flow_map(s: float, h: float) -> None:
    """Averaged over the posterior of (x0, x1) given x_s, per_sample's target (built on the conditional velocity
    x1 - x0) is u(x_s, s, s + h) of the exact map: a z-test at 5 standard errors per coordinate, 4000 draws. A wrong
    sign of d_h u or a wrong tangent moves the mean by ~h |d u| >> the standard error (~0.01)."""
    n, gen, model = 4000, torch.Generator().manual_seed(7), GaussianMap()
    x_s = torch.tensor([1.5, 0.25, -0.75], dtype=torch.float64)
    x0, x1 = _posterior_pairs(x_s, s, n, gen)
    times = torch.full((n,), s, dtype=torch.float64), torch.full((n,), h, dtype=torch.float64)
    assert torch.allclose(path_point(PATH, x0, x1, times[0], None)[0], x_s.expand(n, DIM), atol=1e-12)
    target = meanflow_target(model, x0, x1, *times).double()
    exact = model(x_s[None], times[0][:1], h=times[1][:1])[0]
    z = (target.mean(0) - exact) / (target.std(0) / math.sqrt(n))
    assert z.abs().max() < 5, f"target mean off the flow map by {z.tolist()} standard errors"


def test_meanflow_loss_is_the_adaptively_weighted_error_with_stop_gradients() -> None:
    """loss = sg(w) |u - sg(u_tgt)|^2, w = 1 / (|u - u_tgt|^2 + eps)^power: its gradient in a scale a and shift c
    of the model, u_a = (1 + a) u + c at a = 0, c = 0, is w 2 (u - u_tgt) . (u, 1) (no term from w or u_tgt)."""
    x0, x1 = _pairs(BATCH, 8)
    s, h = _times(BATCH, 9)
    base = Smooth()
    err = MeanFlow(power=0.0).per_sample(base, PATH, x0, x1, s, h, None, "velocity", "squared", {}).double()
    a, c = torch.zeros((), dtype=torch.float64, requires_grad=True), torch.zeros(DIM, dtype=torch.float64,
                                                                                  requires_grad=True)

    class Scaled(nn.Module):
        def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
            return (1 + a) * base(x, t, h=h) + c

    power, eps = 0.7, 0.05
    loss = MeanFlow(power=power, eps=eps).per_sample(Scaled(), PATH, x0, x1, s, h, None, "velocity", "squared", {})
    weight = (err + eps) ** -power
    assert torch.allclose(loss.double(), weight * err, rtol=1e-5)
    grad_a, grad_c = torch.autograd.grad(loss.sum(), (a, c))
    x, _ = path_point(PATH, x0, x1, s, None)
    u = base(x, s, h=h)
    delta = u - meanflow_target(base, x0, x1, s, h).double()
    assert torch.allclose(grad_a, (2 * weight * (delta * u).sum(1)).sum(), rtol=1e-4)
    assert torch.allclose(grad_c, (2 * weight[:, None] * delta).sum(0), rtol=1e-4, atol=1e-6)


class Labelled(nn.Module):
    """u(x, t, t + h | y) = (y + 1) x + t + h with 3 classes (the null class 3): each label its own field."""

    num_classes = 3

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        y = torch.full_like(t, 3, dtype=torch.long) if y is None else y
        h = torch.zeros_like(t) if h is None else h
        return (y + 1)[:, None] * x + (t + h)[:, None]


def test_meanflow_guided_velocity() -> None:
    """v~ = w v + kappa u(x, s, s | y) + (1 - w - kappa) u(x, s, s | null) on rows with a label, v on null rows."""
    g = torch.Generator().manual_seed(22)
    x, v = torch.randn(2, BATCH, DIM, generator=g, dtype=torch.float64)
    s, y = torch.rand(BATCH, generator=g).double(), torch.arange(BATCH) % 4
    w, kappa = 2.5, 0.25
    guided = MeanFlow(guidance=w, kappa=kappa).velocity(Labelled(), x, s, v, {"y": y})
    null = y == 3
    expected = w * v + kappa * ((y + 1)[:, None] * x + s[:, None]) + (1 - w - kappa) * (4 * x + s[:, None])
    assert torch.allclose(guided[~null], expected[~null], rtol=1e-12)
    assert torch.equal(guided[null], v[null])
    assert MeanFlow().velocity(Labelled(), x, s, v, {"y": y}) is v


# ---------------------------------------------------------------------------------------------
# Shortcut models
# ---------------------------------------------------------------------------------------------


def test_exact_map_is_self_consistent() -> None:
    """u(x, t, 2d) = [u(x, t, d) + u(x + d u(x, t, d), t + d, d)] / 2 (X_{t->t+2d} = X_{t+d->t+2d} o X_{t->t+d})."""
    model, x = GaussianMap(), _pairs(BATCH, 10)[0]
    t, d = _times(BATCH, 11)
    d = d / 2
    first = model(x, t, h=d)
    second = model(x + d[:, None] * first, t + d, h=d)
    assert torch.allclose(model(x, t, h=2 * d), (first + second) / 2, rtol=1e-12, atol=1e-12)


def test_shortcut_rows_with_the_exact_map() -> None:
    """37 rows, share 0.25: the first 28 are flow matching, loss |u(x, t, 0) - (x1 - x0)|^2 / D; the last 9
    self-consistency rows have loss 0 where d >= 1 / max_steps, and where d is smaller (2d = 1 / max_steps) the
    two half steps take the velocity: loss |u(x, t, 2d) - [v(x, t) + v(x + d v(x, t), t + d)] / 2|^2 / D."""
    objective = Shortcut(share=0.25, max_steps=4)
    n_sc = objective.consistency_rows(BATCH)
    assert n_sc == 9
    model, (x0, x1) = GaussianMap(), _pairs(BATCH, 12)
    g = torch.Generator().manual_seed(13)
    two_d = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64).repeat(3)
    slots = torch.floor(torch.rand(n_sc, generator=g, dtype=torch.float64) * (2 / two_d - 1))  # t + 2d <= 1
    t = torch.cat([torch.rand(BATCH - n_sc, generator=g).double(), slots * two_d / 2])
    h = torch.cat([torch.zeros(BATCH - n_sc, dtype=torch.float64), two_d])
    loss = objective.per_sample(model, PATH, x0, x1, t, h, None, "velocity", "squared", {}).double()
    x, v = path_point(PATH, x0, x1, t, None)
    fm = BATCH - n_sc
    assert torch.allclose(loss[:fm], ((model(x[:fm], t[:fm]) - v[:fm]) ** 2).sum(1) / DIM, rtol=1e-5)
    exact = two_d / 2 >= 1 / objective.max_steps
    assert loss[fm:][exact].max() < 1e-10
    xs, ts, d = x[fm:][~exact], t[fm:][~exact], two_d[~exact] / 2
    vel = model(xs, ts)
    euler = (vel + model(xs + d[:, None] * vel, ts + d)) / 2
    expected = ((model(xs, ts, h=2 * d) - euler) ** 2).sum(1) / DIM
    assert expected.min() > 1e-8  # the velocity's two steps are not the map's
    assert torch.allclose(loss[fm:][~exact], expected, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Sampling with the map
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flow_map_sample_is_exact_with_the_exact_map(steps: int) -> None:
    """k steps of the exact map from x0 land on X_{0->1}(x0) = mu + sig x0 (fp32: within 1e-5), NFE = k; Euler
    steps of the velocity (h = 0) miss it by far more."""
    x0 = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(14))
    model, grid = GaussianMap(MU.float()), torch.linspace(0, 1, steps + 1)
    res = flow_map_sample(model, x0, grid)
    assert res.nfe == steps and res.x.dtype == torch.float32
    assert torch.allclose(res.x, MU.float() + SIG * x0, atol=1e-5)

    def velocity(x: Tensor, t: Tensor, y: Tensor | None = None, h: Tensor | None = None) -> Tensor:
        return model(x, t)

    assert (flow_map_sample(velocity, x0, grid).x - res.x).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# The objectives' time draws
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("equal", [0.75, 0.3])
def test_meanflow_draw(equal: float) -> None:
    """s in [0, 1], h >= 0, s + h <= 1; a share ``equal`` of h == 0 rows (binomial: within 5 sigma)."""
    n = 20000
    s, h = MeanFlow(equal=equal).draw(n, get_time_sampler("uniform"), torch.Generator().manual_seed(15), n)
    assert s.dtype == h.dtype == torch.float32 and s.shape == h.shape == (n,)
    assert bool(((s >= 0) & (h >= 0) & (s + h <= 1)).all())
    zero = (h == 0).float().mean().item()
    assert abs(zero - equal) < 5 * math.sqrt(equal * (1 - equal) / n)
    # the other rows: (s, s + h) two ordered uniforms, E[s] = 1/3, E[s + h] = 2/3, each sd sqrt(1/18)
    rest = h > 0
    tol = 5 * math.sqrt(1 / 18 / rest.sum().item())
    assert abs(s[rest].mean() - 1 / 3) < tol and abs((s + h)[rest].mean() - 2 / 3) < tol


def test_shortcut_draw() -> None:
    """Per chunk of 37 rows, the last round(0.25 * 37) = 9 have 2d = h a power of 2 in [1 / max_steps, 1], t a
    multiple of d with t + h <= 1 (every such grid point drawn); the others h == 0, t from the time sampler."""
    chunk, max_steps, chunks = 37, 4, 120
    objective = Shortcut(share=0.25, max_steps=max_steps)
    t, h = objective.draw(chunk * chunks, get_time_sampler("uniform"), torch.Generator().manual_seed(16), chunk)
    t, h = t.view(chunks, chunk), h.view(chunks, chunk)
    sc = slice(chunk - 9, chunk)
    assert bool((h[:, :chunk - 9] == 0).all())
    fm_t = t[:, :chunk - 9]
    assert bool(((fm_t >= 0) & (fm_t < 1)).all()) and abs(fm_t.mean() - 0.5) < 5 * math.sqrt(1 / 12 / fm_t.numel())
    two_d, ts = h[:, sc].flatten(), t[:, sc].flatten()
    k = -torch.log2(two_d)
    assert bool((k == k.round()).all()) and set(k.int().tolist()) == {0, 1, 2}
    d = two_d / 2
    slot = ts / d
    assert bool((slot == slot.round()).all()) and bool((ts + two_d <= 1).all())
    for size in (1.0, 0.5, 0.25):
        drawn = sorted(set(ts[two_d == size].tolist()))
        assert drawn == [i * size / 2 for i in range(int(2 / size) - 1)], (size, drawn)


# ---------------------------------------------------------------------------------------------
# Arguments and configs: one clear error
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("objective", "args", "words"), [
    ("meanflow", ["equal=1.5"], "equal=1.5"),
    ("meanflow", ["power=-1"], "power=-1"),
    ("shortcut", ["share=0"], "share"),
    ("shortcut", ["max_steps=3"], "max_steps"),
    ("meanflow", ["bogus=1"], "bogus"),
    ("meanflow", ['equal="half"'], "equal"),
    ("meanflow", ["eps=Infinity"], "eps"),
    ("shortcut", ["max_steps=true"], "max_steps"),
])
def test_bad_objective_args_are_one_clear_error(tmp_path: Path, objective: str, args: list[str], words: str) -> None:
    argv = train_argv(tmp_path / "run", "--data", "moons", "--objective", objective, "--objective-args", *args,
                      steps=1)
    msg = cli_error(train.main, argv)
    assert words in msg and objective in msg, msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("extra", "words"), [
    (["--target", "x1"], "--target x1"),
    (["--path", "learned"], "--path learned"),
    (["--model-args", "flow_map=false"], "flow_map=false"),
    (["--loss", "pseudo-huber"], "--loss must be squared"),
    (["--objective-args", "guidance=2"], "--class-cond"),
    (["--memory-format", "channels_last"], "--memory-format channels_last"),
])
def test_meanflow_config_contradictions_are_one_clear_error(tmp_path: Path, extra: list[str], words: str) -> None:
    argv = train_argv(tmp_path / "run", "--data", "moons", "--objective", "meanflow", *extra, steps=1)
    msg = cli_error(train.main, argv)
    assert words in msg and "meanflow" in msg, msg
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _loss_and_grads(step: Callable[..., Tensor], model: nn.Module, *inputs: Tensor | None,
                    ) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = step(*inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("objective", [MeanFlow(), Shortcut(share=0.25, max_steps=8)], ids=["meanflow", "shortcut"])
def test_compiled_step_equals_eager(objective: MeanFlow | Shortcut) -> None:
    """LossStep traced by torch.compile(fullgraph=True) (the JVP, the no-grad consistency calls, in-kernel noise)
    has the eager step's loss and gradients within fp32 rounding. aot_eager: dynamo's graph and AOT autograd's
    forward and backward without inductor's code generation (which takes two minutes on 2 CPU cores;
    tests/test_cuda.py runs inductor on a GPU)."""
    torch.manual_seed(17)
    model = perturb_(MLP(2, hidden=24, depth=2, time_dim=16, flow_map=True))
    step = LossStep(model, get_path("condot"), objective, "velocity", "squared", 0, False)
    gen = torch.Generator().manual_seed(18)
    x1 = torch.randn(BATCH, 2, generator=gen)
    t, h = objective.draw(BATCH, get_time_sampler("uniform"), gen, BATCH)
    inputs = (None, x1, t, h, None, philox_state(19, 0, rows=BATCH))
    eager_loss, eager_grads = _loss_and_grads(step, model, *inputs)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grads = _loss_and_grads(compiled, model, *inputs)
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max() for g in eager_grads) > 1e-3


def test_meanflow_keeps_an_image_model_contiguous() -> None:
    """Group norm's forward-mode rule fails on channels_last activations, so the trainer never puts the model of a
    JVP objective in that layout (auto on CUDA included); asking for it is a config error (above)."""
    model = perturb_(UNet(1, model_channels=8, channel_mult=[1], num_res_blocks=1, image_size=8, flow_map=True),
                     std=0.05)
    gen = torch.Generator().manual_seed(21)
    x0, x1 = torch.randn(2, 5, 1, 8, 8, generator=gen)
    t, h = MeanFlow().draw(5, get_time_sampler("uniform"), gen, 5)
    args = (get_path("condot"), x0, x1, t, h, None, "velocity", "squared", {})
    assert torch.isfinite(MeanFlow().per_sample(model, *args)).all()
    cfg = TrainConfig(data="digits", objective="meanflow", memory_format="auto")
    for device in ("cpu", "cuda"):
        assert not channels_last(cfg, torch.device(device), True, MeanFlow())
        assert channels_last(cfg, torch.device("cuda"), True, Shortcut())
    with pytest.raises(RuntimeError):  # the failure the rule avoids: if it passes, the rule can go
        MeanFlow().per_sample(model.to(memory_format=torch.channels_last), *args)


def test_meanflow_resume_with_dropout_is_bitwise(tmp_path: Path) -> None:
    """A UNet with dropout (the MLP has none) under MeanFlow's JVP, whose dropout masks are drawn from the global
    RNG: 1 + 1 steps with a resume end on the weights of 2 steps (the RNG's state restored exactly)."""
    opts = dict(DROPOUT, objective="meanflow")
    _train(tmp_path / "full", **opts, steps=2)
    _train(tmp_path / "split", **opts, steps=1)
    _train(tmp_path / "split", **opts, steps=2, resume=True)
    _same_weights(tmp_path / "full", tmp_path / "split")


def test_meanflow_on_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    """The times of the global batch, per-sample losses: 2 ranks on half the batch each end on the one-process
    weights after 5 steps, to a few fp32 ulps of the O(1) weights (the all-reduce sums in another order: 3e-8
    seen; another seed moves them by 0.35)."""
    _one(tmp_path / "one", objective="meanflow")
    _torchrun(tmp_path / "ddp", objective="meanflow")
    assert _max_diff(tmp_path / "one", tmp_path / "ddp") < 1e-6
