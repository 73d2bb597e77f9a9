"""ODE solvers: convergence orders on linear ODEs with known solutions, tuple states, grids, NFE,
backward integration, dopri5, errors, and a graph-break-free torch.compile of a fixed-step solve."""

from __future__ import annotations

import math

import pytest
import torch

from fastfm.solve.solvers import ADAPTIVE_SOLVERS, check_grid, odeint_fixed, solve, solver_of, time_grid

FIXED = {"euler": (1, 1), "midpoint": (2, 2), "heun": (2, 2), "rk4": (4, 4)}  # method: (order, stages)

# rotation + decay: eigenvalues -0.5 +- 2i
A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)
Y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0], [0.7, -1.1], [0.2, 0.1], [-1.5, 0.4]], dtype=torch.float64)  # batch 5


def rot(t, y):
    return y @ A.T


def rot_exact(y0, t0=0.0, t1=1.0):
    return y0 @ torch.linalg.matrix_exp((t1 - t0) * A).T


def cos_field(t, y):
    return torch.cos(t.double()) * y


def cos_exact(y0, t0=0.0, t1=1.0):
    return y0 * math.exp(math.sin(t1) - math.sin(t0))


PROBLEMS = {"rotation": (rot, rot_exact), "cos": (cos_field, cos_exact)}


def _err(method, steps, problem):
    f, exact = PROBLEMS[problem]
    res = solve(f, Y0, solver=method, steps=steps)
    assert res.y.dtype == torch.float64
    return float((res.y - exact(Y0)).abs().max())


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", list(FIXED))
def test_convergence_order(method, problem):
    order = FIXED[method][0]
    ns = (8, 16, 32, 64)
    errs = [_err(method, n, problem) for n in ns]
    observed = [math.log2(errs[i] / errs[i + 1]) for i in range(len(ns) - 1)]
    assert abs(observed[-1] - order) < 0.25, f"{method} on {problem}: observed orders {observed}, errors {errs}"
    assert all(abs(o - order) < 0.35 for o in observed), observed


@pytest.mark.parametrize("method", list(FIXED))
def test_nfe(method):
    stages = FIXED[method][1]
    calls = 0

    def f(t, y):
        nonlocal calls
        calls += 1
        return rot(t, y)

    for steps in (1, 5, 12):
        calls = 0
        res = solve(f, Y0, solver=method, steps=steps)
        assert res.nfe == steps * stages == calls
        assert solver_of(method).stages == stages


def test_tuple_state():
    def f(t, state):
        a, b = state
        return rot(t, a), cos_field(t, b)

    b0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = solve(f, (Y0, b0), solver="rk4", steps=32)
    assert isinstance(res.y, tuple) and len(res.y) == 2
    torch.testing.assert_close(res.y[0], rot_exact(Y0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res.y[1], cos_exact(b0), rtol=1e-6, atol=1e-6)
    # the tuple solve equals the two separate solves exactly
    torch.testing.assert_close(res.y[0], solve(rot, Y0, solver="rk4", steps=32).y, rtol=0, atol=0)
    torch.testing.assert_close(res.y[1], solve(cos_field, b0, solver="rk4", steps=32).y, rtol=0, atol=0)


def test_return_intermediates():
    steps = 7
    res = solve(rot, Y0, solver="rk4", steps=steps, return_intermediates=True)
    traj = res.intermediates
    assert traj.shape == (steps + 1, *Y0.shape)
    assert torch.equal(traj[0], Y0)
    assert torch.equal(traj[-1], res.y)
    grid = time_grid(steps).double()
    for k in range(steps + 1):
        torch.testing.assert_close(traj[k], rot_exact(Y0, 0.0, float(grid[k])), rtol=1e-4, atol=1e-4)

    b0 = torch.ones(5, 3, dtype=torch.float64)
    tup = solve(lambda t, s: (rot(t, s[0]), cos_field(t, s[1])), (Y0, b0), solver="midpoint", steps=steps,
                return_intermediates=True)
    assert isinstance(tup.intermediates, tuple)
    assert tup.intermediates[0].shape == (steps + 1, 5, 2) and tup.intermediates[1].shape == (steps + 1, 5, 3)
    assert torch.equal(tup.intermediates[0][0], Y0) and torch.equal(tup.intermediates[1][0], b0)
    assert solve(rot, Y0, solver="rk4", steps=steps).intermediates is None


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_backward_integration_inverts_forward(problem):
    f, exact = PROBLEMS[problem]
    fwd = solve(f, Y0, solver="rk4", steps=32)
    back = solve(f, fwd.y, solver="rk4", steps=32, t0=1.0, t1=0.0)
    torch.testing.assert_close(back.y, Y0, rtol=1e-6, atol=1e-6)
    # and backward alone matches the exact backward flow
    y1 = exact(Y0)
    torch.testing.assert_close(solve(f, y1, solver="rk4", steps=32, t0=1.0, t1=0.0).y, Y0, rtol=1e-6, atol=1e-6)
    # a partial interval
    torch.testing.assert_close(solve(f, Y0, solver="rk4", steps=32, t0=0.25, t1=0.75).y, exact(Y0, 0.25, 0.75),
                               rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_non_uniform_grid(problem):
    f, exact = PROBLEMS[problem]
    grid = check_grid((torch.linspace(0, 1, 41, dtype=torch.float64) ** 2).tolist())
    res = solve(f, Y0, solver="rk4", grid=grid, return_intermediates=True)
    assert res.nfe == 40 * 4
    torch.testing.assert_close(res.y, exact(Y0), rtol=1e-6, atol=1e-6)
    for k in (5, 20, 40):
        torch.testing.assert_close(res.intermediates[k], exact(Y0, 0.0, float(grid[k])), rtol=1e-6, atol=1e-6)
    # decreasing non-uniform grid integrates backwards
    back = solve(f, exact(Y0), solver="rk4", grid=grid.flip(0))
    torch.testing.assert_close(back.y, Y0, rtol=1e-6, atol=1e-6)
    # a coarse non-uniform grid still is a first-order scheme for euler: error halves when steps double
    g1 = torch.linspace(0, 1, 17) ** 1.5
    g2 = torch.linspace(0, 1, 33) ** 1.5
    e1 = float((odeint_fixed(f, Y0, g1, "euler").y - exact(Y0)).abs().max())
    e2 = float((odeint_fixed(f, Y0, g2, "euler").y - exact(Y0)).abs().max())
    assert abs(math.log2(e1 / e2) - 1) < 0.3


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_dopri5(problem):
    f, exact = PROBLEMS[problem]
    res = solve(f, Y0, solver="dopri5", rtol=1e-9, atol=1e-9)
    assert res.nfe > 0
    assert float((res.y - exact(Y0)).abs().max()) < 1e-6
    tup = solve(lambda t, s: (f(t, s[0]), f(t, s[1])), (Y0, 2 * Y0), solver="dopri5", rtol=1e-9, atol=1e-9)
    assert tup.nfe > 0
    torch.testing.assert_close(tup.y[1], 2 * exact(Y0), rtol=1e-6, atol=1e-6)
    grid = torch.tensor([0.0, 0.3, 1.0])
    inter = solve(f, Y0, solver="dopri5", grid=grid, rtol=1e-9, atol=1e-9, return_intermediates=True).intermediates
    assert inter.shape == (3, *Y0.shape)
    torch.testing.assert_close(inter[1], exact(Y0, 0.0, float(grid[1])), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", list(ADAPTIVE_SOLVERS))
@pytest.mark.parametrize("t0,t1", [(0.0, 0.999), (0.999, 0.0), (0.2, 0.7)])
def test_adaptive_never_leaves_the_interval(solver, t0, t1):
    """torchdiffeq steps past the end and interpolates back unless told to stop on it; a field undefined
    outside [t0, t1] (VP's sigma_t is NaN for t > 1) must still integrate, and to the right value."""
    lo, hi = (float(torch.tensor(t, dtype=torch.float32)) for t in (min(t0, t1), max(t0, t1)))  # the grid's fp32
    seen = []

    def field(t, y):
        seen.append(float(t))
        return torch.where((t >= lo) & (t <= hi), torch.cos(t.double()), torch.nan) * y

    res = solve(field, Y0, solver=solver, t0=t0, t1=t1, rtol=1e-7, atol=1e-7)
    assert lo <= min(seen) and max(seen) <= hi, (min(seen), max(seen))
    torch.testing.assert_close(res.y, cos_exact(Y0, t0, t1), rtol=1e-5, atol=1e-5)


def test_unknown_solver_raises():
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        solve(rot, Y0, solver="rk45")
    with pytest.raises(ValueError, match="'dopri5'"):
        odeint_fixed(rot, Y0, time_grid(4), solver="dopri5")
    with pytest.raises(ValueError, match="'bogus'"):
        solver_of("bogus")


@pytest.mark.parametrize("grid", [
    [0.0, 0.5, 0.4, 1.0],   # not monotone
    [0.0, 0.5, 0.5, 1.0],   # not strictly monotone
    [-0.1, 0.5, 1.0],       # below 0
    [0.0, 0.5, 1.2],        # above 1
    [1.0, 0.5, -0.5],       # decreasing but out of range
    [0.5],                  # a single time
    [0.0, float("nan"), 1.0],
])
def test_check_grid_rejects(grid):
    with pytest.raises(ValueError, match="time grid"):
        check_grid(grid)


def test_check_grid_accepts():
    for grid in ([0.0, 0.1, 0.7, 1.0], [1.0, 0.2, 0.0], [0.3, 0.4]):
        g = check_grid(grid)
        assert g.dtype == torch.float32 and g.tolist() == pytest.approx(grid)


def test_bad_grid_shape_and_steps():
    with pytest.raises(ValueError, match="at least 2"):
        solve(rot, Y0, grid=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="steps"):
        solve(rot, Y0, steps=0)


def test_time_grid():
    g = time_grid(5)
    assert g.dtype == torch.float32 and g.shape == (6,)
    torch.testing.assert_close(g, torch.linspace(0, 1, 6))
    torch.testing.assert_close(time_grid(4, 1.0, 0.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


# ---------------------------------------------------------------- torch.compile

def test_fixed_step_solve_compiles_without_graph_breaks():
    g = torch.Generator().manual_seed(1)
    w1, w2 = 0.5 * torch.randn(3, 8, generator=g), 0.5 * torch.randn(8, 3, generator=g)
    b1 = torch.randn(8, generator=g)

    def field(t, y):
        return torch.tanh(y @ w1 + t * b1) @ w2

    def run(y0):
        return solve(field, y0, solver="heun", steps=3).y

    y0 = torch.randn(5, 3, generator=g)
    expected = run(y0)
    torch.compiler.reset()
    explanation = torch._dynamo.explain(run)(y0)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(y0), expected, rtol=1e-5, atol=1e-6)
    torch.compiler.reset()
