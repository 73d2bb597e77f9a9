"""Experiment ``interpolants``: stochastic interpolants (Albergo & Vanden-Eijnden, 2022), at small scale.

Three parts. (1) ODE against SDE sampling of one field (Gaussian -> checkerboard, linear interpolant): the SDE
dX = [v + eps/2 score] dt + sqrt(eps) dW takes its score from the velocity and has the ODE's marginals at every
diffusion level eps, so its samples should match the ODE's as its steps grow. (2) Data to data: GMM -> moons
and moons -> checkerboard with the linear and the trig interpolant, against a Gaussian-source flow trained the
same way. (3) The likelihood of the target under a data-to-data flow, computed along the path from the GMM's
exact density, against the Gaussian-source flow's.
"""

from __future__ import annotations

from typing import Any

from fastfm.experiments.common import (FLOOR_DRAWS, REFERENCE_POINTS, SETTLED, Context, Judge, Trained, attempt,
                                       lines_png, nll_value, scatter_png, solve_label, train, trajectories_png,
                                       trajectory)
from fastfm.experiments.report import Report
from fastfm.inference import nll_report

PAIRS = (("gmm", "moons"), ("moons", "checkerboard"))
"""Data-to-data transports (source, target)."""
INTERPOLANTS = ("linear", "trig")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"train": {"steps": 30, "batch_size": 128}, "samples": 128, "nll_n": 64, "sde_steps": [4, 8],
             "diffusions": ["0", "0.5", "sin2:1"], "traj_steps": 8, "solve": {"solver": "rk4", "steps": 4}},
    "cpu": {"train": {"steps": 3000, "batch_size": 512}, "samples": 4000, "nll_n": 600, "sde_steps": [50, 200, 500],
            "diffusions": ["0", "0.1", "0.5", "1", "2", "sin2:1"], "traj_steps": 32, "solve": {"solver": "dopri5"}},
    "gpu": {"train": {"steps": 8000, "batch_size": 4096}, "samples": 10000, "nll_n": 5000,
            "sde_steps": [50, 200, 800, 3200], "diffusions": ["0", "0.1", "0.5", "1", "2", "5", "sin2:1", "sin2:4"],
            "traj_steps": 64, "solve": {"solver": "dopri5"}},
}

DESCRIPTION = "ODE vs SDE sampling, data-to-data transport (linear, trig), likelihood along the path"
NLL_CLOSE = 0.25
"""Nats within which two flows' NLL of the same test set count as the same."""


def trainings(scale: str) -> dict[str, dict[str, Any]]:
    """Every run this experiment trains at ``scale``: key -> TrainConfig options."""
    opts = SIZES[scale]["train"]
    runs = {f"gaussian-{t}-linear": {"data": t, "path": "linear", **opts} for t in ("checkerboard", "moons")}
    runs.update({f"{s}-{t}-{i}": {"data": t, "source": s, "path": i, **opts} for s, t in PAIRS for i in INTERPOLANTS})
    return runs


def run(ctx: Context) -> Report:
    size = SIZES[ctx.scale]
    report = Report("interpolants", "Stochastic interpolants: ODE vs SDE, data to data, likelihood", ctx.scale,
                    intro=__doc__.split("\n\n", 1)[1], settings=size)
    ctx.plan("interpolants", 5 + 2 * len(PAIRS) * len(INTERPOLANTS))
    ref = solve_label(size['solve'])
    runs = trainings(ctx.scale)
    base = {t: train(ctx, f"gaussian-{t}-linear", runs[f"gaussian-{t}-linear"]) for t in ("checkerboard", "moons")}
    judges = {t: Judge(run_.data, ctx.seed) for t, run_ in base.items()}
    floors = {t: judge.floor(size["samples"]) for t, judge in judges.items()}
    report.data["floors"] = floors
    _ode_vs_sde(ctx, report, base["checkerboard"], size, judges["checkerboard"], floors["checkerboard"])
    rows, panels, nll_rows = [], {}, []
    base_q = {}
    for t, run_ in base.items():
        ctx.stage(f"evaluate gaussian -> {t}")
        res = _transport(run_, size, ctx, report.notes, judges[t])
        base_q[t] = res["quality"]
        rows.append(["gaussian", t, "linear", res["quality"], *floors[t], res["nfe"]])
        panels[f"gaussian -> {t} (linear)"] = res["trajectory"]
        if res["nll"] is not None:
            nll_rows.append(["gaussian", t, "linear", res["nll"], res["nll_stderr"], res["nll_nfe"]])
        ctx.done()
    for source, target in PAIRS:
        for interp in INTERPOLANTS:
            run_ = train(ctx, f"{source}-{target}-{interp}", runs[f"{source}-{target}-{interp}"])
            ctx.stage(f"evaluate {source} -> {target} ({interp})")
            res = _transport(run_, size, ctx, report.notes, judges[target])
            rows.append([source, target, interp, res["quality"], *floors[target], res["nfe"]])
            panels[f"{source} -> {target} ({interp})"] = res["trajectory"]
            q, b, spread = res["quality"], base_q[target], floors[target][1]
            report.claim(f"the {interp} interpolant transports {source} to {target} as well as a Gaussian source "
                         f"does (no worse by more than {SETTLED} x the data's own spread)",
                         None if q is None or b is None else q <= b + SETTLED * spread,
                         "sliced W2 {q} vs {b} from a Gaussian source, spread {s}", q=q, b=b, s=spread)
            if res["nll"] is not None:
                nll_rows.append([source, target, interp, res["nll"], res["nll_stderr"], res["nll_nfe"]])
                gauss = next(r[3] for r in nll_rows if r[0] == "gaussian" and r[1] == target)
                report.claim(f"the likelihood of {target} along the {interp} path from {source} (its exact density) "
                             f"agrees with the Gaussian-source flow's (within {NLL_CLOSE} nats)",
                             abs(res["nll"] - gauss) <= NLL_CLOSE, "NLL {a} vs {b} nats", a=res["nll"], b=gauss)
            ctx.done()
    report.table("transport", "Data to data: sample quality of the target",
                 ["source", "target", "interpolant", "sliced W2", "floor", "floor std", f"NFE ({ref})"], rows,
                 note=f"{size['samples']} samples by {ref}; sliced W2 to {REFERENCE_POINTS} fresh points of the "
                      f"target; floor: the same for {FLOOR_DRAWS} fresh draws of {size['samples']} target points "
                      f"(mean, std).")
    report.table("likelihood", "Likelihood of the target along the path",
                 ["source", "target", "interpolant", "test NLL (nats)", "stderr", f"NFE ({ref})"], nll_rows,
                 note=f"log p_1(x) = log p_0(x(0)) - int div v dt by {ref}, exact divergence; the GMM source's "
                      f"density is exact, the moons source has none (no row).")
    ctx.out.mkdir(parents=True, exist_ok=True)
    trajectories_png(ctx.out / "transport.png", panels, title=f"RK4 x {size['traj_steps']} trajectories")
    report.figure("transport.png", "Trajectories from the source (blue) to the target (red), per interpolant")
    ctx.close()
    return report


def _transport(run_: Trained, size: dict[str, Any], ctx: Context, notes: list[str], judge: Judge
               ) -> dict[str, Any]:
    """Sample quality, NFE and (where the source has a density) test NLL of one flow, and its trajectories."""
    ref, data, seed = run_.sampler(**size["solve"]), run_.data, ctx.seed
    res = attempt(notes, f"{run_.key} sampling", lambda: ref.sample(size["samples"], seed=seed, progress=ctx.progress))
    out: dict[str, Any] = {"quality": None if res is None else judge(res.x),
                           "nfe": None if res is None else res.nfe, "nll": None, "nll_stderr": None, "nll_nfe": None}
    tr = run_.trainer
    if tr.path.prior.has_log_prob:
        nll = attempt(notes, f"{run_.key} test NLL", lambda: nll_report(ref, data.test[:size["nll_n"]], seed=seed,
                                                                         progress=ctx.progress))
        if nll is not None:
            out.update(nll=nll_value(nll), nll_stderr=nll["nll_nats_stderr"], nll_nfe=nll["nfe"])
    out["trajectory"] = trajectory(run_, size["traj_steps"], seed)
    return out


def _ode_vs_sde(ctx: Context, report: Report, run_: Trained, size: dict[str, Any], judge: Judge,
                floor: tuple[float, float]) -> None:
    """SDE samples at each diffusion level and step count against the ODE's (reference solve and Euler)."""
    ctx.stage("ODE vs SDE")
    seed, n = ctx.seed, size["samples"]
    ref = attempt(report.notes, "ODE reference sampling",
                  lambda: run_.sampler(**size["solve"]).sample(n, seed=seed, progress=ctx.progress))
    ode_q = None if ref is None else judge(ref.x)
    rows, curves, scatter = [], {}, {}
    for steps in size["sde_steps"]:
        euler = run_.sampler(solver="euler", steps=steps).sample(n, seed=seed, progress=False)
        curves.setdefault("ODE (Euler)", ([], []))
        curves["ODE (Euler)"][0].append(steps)
        curves["ODE (Euler)"][1].append(judge(euler.x))
        for eps in size["diffusions"]:
            x = run_.sampler(diffusion=eps, steps=steps).sample(n, seed=seed, progress=False).x
            q = judge(x)
            rows.append([eps, steps, q, curves["ODE (Euler)"][1][-1], ode_q])
            curves.setdefault(f"SDE eps={eps}", ([], []))
            curves[f"SDE eps={eps}"][0].append(steps)
            curves[f"SDE eps={eps}"][1].append(q)
            if steps == size["sde_steps"][-1]:
                scatter[f"SDE eps={eps}"] = x
    last = size["sde_steps"][-1]
    for eps in size["diffusions"]:
        q = curves[f"SDE eps={eps}"][1][-1]
        report.claim(f"the SDE with eps = {eps} (score from the velocity) samples the ODE's distribution (no "
                     f"worse by more than {SETTLED} x the data's own spread)",
                     None if ode_q is None else q <= ode_q + SETTLED * floor[1],
                     "sliced W2 {q} at {s} Euler-Maruyama steps vs the ODE's {o}; floor {f}, spread {d}", q=q,
                     s=last, o=ode_q, f=floor[0], d=floor[1])
    report.table("sde", "ODE vs SDE sampling (Gaussian -> checkerboard, linear interpolant)",
                 ["eps", "steps", "SDE sliced W2", "ODE Euler sliced W2",
                  f"ODE {solve_label(size['solve'])} sliced W2"], rows,
                 note=f"{n} samples; eps(t) constant, or sin2:C = C sin^2(pi t); Euler-Maruyama with a final "
                      f"denoising jump; sliced W2 to {REFERENCE_POINTS} fresh data points (floor: see the "
                      f"transport table).")
    ctx.out.mkdir(parents=True, exist_ok=True)
    lines_png(ctx.out / "sde_quality_vs_steps.png", {"Gaussian -> checkerboard": curves}, xlabel="steps",
              ylabel="sliced W2 (lower is better)", logx=True, logy=True)
    report.figure("sde_quality_vs_steps.png", "Sample quality against steps: SDE at each diffusion level vs ODE Euler")
    ode = {} if ref is None else {f"ODE ({solve_label(size['solve'])})": ref.x}
    scatter_png(ctx.out / "sde_samples.png", {**ode, **scatter}, title=f"samples at {last} steps")
    report.figure("sde_samples.png", f"ODE and SDE samples ({last} steps)")
    ctx.done()
