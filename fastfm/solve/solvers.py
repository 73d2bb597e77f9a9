"""ODE solvers over states that are a tensor or a tuple of tensors.

Fixed-step explicit Runge-Kutta (Euler, midpoint, Heun, RK4) from one Butcher-tableau loop:
no host syncs and no data-dependent control flow, so torch.compile and torch.export trace the
whole unrolled solve. Adaptive dopri5 goes through torchdiffeq, for reference solves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

import torch
from torch import Tensor

from fastfm.registry import Registry

DEFAULT_SOLVER, DEFAULT_STEPS = "midpoint", 32
"""The one default of every solve, eager or exported (``fastfm.solve.settings.DEFAULTS`` takes them)."""
FLOW_MAP, FLOW_MAP_STEPS = "flowmap", 1
"""The solver of flow-map models (x_t = x_s + (t - s) u(x_s, s, t): one call per step) and its default steps."""
ADAPTIVE_TOL = 1e-5
"""rtol = atol of the adaptive (torchdiffeq) solvers."""

State = Union[Tensor, tuple[Tensor, ...]]
Field = Callable[[Tensor, State], State]


class Tableau(NamedTuple):
    """An explicit Runge-Kutta method: stage times c, lower-triangular stage weights A, output weights b."""

    c: list[float]
    a: list[list[float]]
    b: list[float]


@dataclass(frozen=True)
class Solver:
    """A registered solver: fixed-step (its ``tableau``: steps x stages field evaluations, traceable, exportable),
    adaptive (``method``, torchdiffeq's name: steps set by rtol/atol, for reference solves) or the steps of a
    flow map (``flow_map``: one call per step, fixed, of a model of two times). ``steps``: its default steps."""

    name: str
    tableau: Tableau | None = None
    method: str | None = None
    flow_map: bool = False
    steps: int = DEFAULT_STEPS

    @property
    def fixed(self) -> bool:
        return self.method is None

    @property
    def stages(self) -> int:
        """Field evaluations per step of a fixed-step solver (stages with a used output; 1 for a flow map)."""
        if self.method is not None:
            raise ValueError(f"{self.name} is adaptive: its evaluations per step are not fixed")
        return 1 if self.tableau is None else len(self.tableau.c)


SOLVERS: Registry[Solver] = Registry("solver")
"""Every solver ``solve`` takes, fixed-step or adaptive (``Solver.fixed``)."""


def _made(solver: Solver) -> Callable[[], Solver]:
    return lambda: solver


for _name, _help, _tableau in (
    ("euler", "Euler, 1 evaluation per step, order 1", Tableau([0.0], [[]], [1.0])),
    ("midpoint", "explicit midpoint, 2 evaluations per step, order 2", Tableau([0.0, 0.5], [[], [0.5]], [0.0, 1.0])),
    ("heun", "Heun, 2 evaluations per step, order 2", Tableau([0.0, 1.0], [[], [1.0]], [0.5, 0.5])),
    ("rk4", "classic Runge-Kutta, 4 evaluations per step, order 4",
     Tableau([0.0, 0.5, 0.5, 1.0], [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6])),
):
    SOLVERS.register(_name, _help, _made(Solver(_name, tableau=_tableau)))
for _name, _help in (
    ("dopri5", "adaptive Dormand-Prince 5(4) (torchdiffeq), steps set by rtol/atol"),
    ("dopri8", "adaptive Dormand-Prince 8(7) (torchdiffeq)"),
    ("bosh3", "adaptive Bogacki-Shampine 3(2) (torchdiffeq)"),
    ("adaptive_heun", "adaptive Heun-Euler 2(1) (torchdiffeq)"),
):
    SOLVERS.register(_name, _help, _made(Solver(_name, method=_name)))
SOLVERS.register(FLOW_MAP, "the steps of a flow map, x_t = x_s + (t - s) u(x_s, s, t): 1 call per step, for models "
                 f"of two times (flow_map=true; default {FLOW_MAP_STEPS} step)",
                 _made(Solver(FLOW_MAP, flow_map=True, steps=FLOW_MAP_STEPS)))


def solver_of(name: str) -> Solver:
    """The registered solver ``name`` (ValueError naming the valid ones)."""
    return SOLVERS.build(name)


FIXED_SOLVERS = tuple(n for n in SOLVERS if solver_of(n).tableau is not None)
"""The fixed-step ODE solvers (Runge-Kutta tableaus)."""
STEPPED_SOLVERS = tuple(n for n in SOLVERS if solver_of(n).fixed)
"""Every solver with a fixed number of steps, which an engine unrolls: the tableaus and the flow map's steps."""
ADAPTIVE_SOLVERS = tuple(n for n in SOLVERS if not solver_of(n).fixed)


@dataclass
class SolveResult:
    """Final state, number of field evaluations, and (optionally) the state at every grid time."""

    y: State
    nfe: int
    intermediates: State | None = None


def _axpy(y: State, h: Tensor, terms: Sequence[tuple[float, State]]) -> State:
    """y + h * sum_j w_j k_j, elementwise over tuple states; zero weights are skipped."""
    def one(i: int | None) -> Tensor:
        base = y if i is None else y[i]
        acc = None
        for w, k in terms:
            if w != 0.0:
                kk = k if i is None else k[i]
                acc = w * kk if acc is None else acc + w * kk
        return base if acc is None else base + h * acc
    return one(None) if isinstance(y, Tensor) else tuple(one(i) for i in range(len(y)))


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """Uniform fp32 grid of steps + 1 times from t0 to t1 (t1 < t0 integrates backwards)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(t0, t1, steps + 1, device=device, dtype=torch.float32)


def _stack(states: list[State]) -> State:
    if isinstance(states[0], Tensor):
        return torch.stack(states)
    return tuple(torch.stack([s[i] for s in states]) for i in range(len(states[0])))


def odeint_fixed(f: Field, y0: State, grid: Tensor, solver: str = DEFAULT_SOLVER,
                 return_intermediates: bool = False) -> SolveResult:
    """Integrate dy/dt = f(t, y) over ``grid`` (fp32, monotone) with an explicit RK tableau."""
    tab = solver_of(solver).tableau
    if tab is None:
        raise ValueError(f"{solver!r} is not a Runge-Kutta tableau: odeint_fixed takes one of "
                         f"{', '.join(FIXED_SOLVERS)}")
    c, a, b = tab
    y, states = y0, [y0]
    for i in range(grid.shape[0] - 1):
        t, h = grid[i], grid[i + 1] - grid[i]
        ks: list[State] = []
        for ci, ai in zip(c, a):
            yi = _axpy(y, h, list(zip(ai, ks)))
            ks.append(f(t + ci * h, yi))
        y = _axpy(y, h, list(zip(b, ks)))
        if return_intermediates:
            states.append(y)
    return SolveResult(y, (grid.shape[0] - 1) * len(c), _stack(states) if return_intermediates else None)


def odeint_adaptive(f: Field, y0: State, grid: Tensor, solver: str = "dopri5", rtol: float = ADAPTIVE_TOL,
                    atol: float = ADAPTIVE_TOL, return_intermediates: bool = False) -> SolveResult:
    """Adaptive reference solve (torchdiffeq), reporting the field evaluations it used.

    The solver steps exactly onto the grid's last time (``step_t``): torchdiffeq otherwise steps past it and
    interpolates back, evaluating the field outside the interval, where a path's schedule may be undefined
    (VP's sigma_t = sqrt(1 - alpha_t^2) is NaN for t > 1)."""
    from torchdiffeq import odeint

    nfe = 0

    def counted(t: Tensor, y: State) -> State:
        nonlocal nfe
        nfe += 1
        return f(t, y)

    try:
        ys = odeint(counted, y0, grid, rtol=rtol, atol=atol, method=solver_of(solver).method,
                    options={"step_t": grid[-1:]})
    except AssertionError as e:  # torchdiffeq asserts on a step size that underflows
        raise ValueError(f"{solver} could not integrate this field ({e}; {nfe} evaluations): it is too stiff near "
                         "an end of the time interval; use a fixed-step solver (e.g. rk4) or looser rtol/atol") from None
    final = ys[-1] if isinstance(ys, Tensor) else tuple(s[-1] for s in ys)
    return SolveResult(final, nfe, ys if return_intermediates else None)


def solve(f: Field, y0: State, solver: str = DEFAULT_SOLVER, steps: int = DEFAULT_STEPS, grid: Tensor | None = None,
          t0: float = 0.0, t1: float = 1.0, rtol: float = ADAPTIVE_TOL, atol: float = ADAPTIVE_TOL,
          return_intermediates: bool = False) -> SolveResult:
    """Solve from t0 to t1 on a uniform grid of ``steps`` steps, or on a user-given ``grid``.

    Adaptive solvers use the grid only for the times they report.
    """
    fixed = solver_of(solver).fixed
    if grid is None:
        grid = time_grid(steps if fixed else 1, t0, t1, device=_device(y0))
    elif grid.dim() != 1 or grid.shape[0] < 2:
        raise ValueError(f"time grid must be 1-D with at least 2 times, got shape {tuple(grid.shape)}")
    grid = grid.to(torch.float32)
    if fixed:
        return odeint_fixed(f, y0, grid, solver, return_intermediates)
    return odeint_adaptive(f, y0, grid, solver, rtol, atol, return_intermediates)


def check_grid(grid: Sequence[float]) -> Tensor:
    """Validate a user-given time grid (host-side, before solving): strictly monotone, within [0, 1]."""
    g = torch.as_tensor(grid, dtype=torch.float32)
    if g.dim() != 1 or g.numel() < 2:
        raise ValueError(f"time grid must be 1-D with >= 2 times, got shape {tuple(g.shape)}")
    d = g[1:] - g[:-1]
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise ValueError(f"time grid must be strictly monotone, got {g.tolist()}")
    if bool((g < 0).any()) or bool((g > 1).any()):
        raise ValueError(f"time grid must lie in [0, 1], got {g.tolist()}")
    return g


def _device(y: State) -> torch.device:
    return (y if isinstance(y, Tensor) else y[0]).device
