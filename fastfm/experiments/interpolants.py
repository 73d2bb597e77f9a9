"""Experiment ``interpolants``: stochastic interpolants (Albergo & Vanden-Eijnden, 2022), at small scale; the
report's introduction (``intro``) is written from its settings.
"""

from __future__ import annotations

from typing import Any

import torch

from fastfm.experiments.common import (VERDICTS, Context, Trained, attempt, lines_png, nll_stderr, nll_value,
                                       recorded, clouds_png, solve_label, train, trajectories_png, trajectory)
from fastfm.experiments.exact import CheckerboardVelocity
from fastfm.experiments.judges import FLOOR_DRAWS, REFERENCE_POINTS, Judge
from fastfm.experiments.report import Report
from fastfm.experiments.verdicts import SETTLED, Verdict, close, converged_no_worse, no_worse, noise
from fastfm.solve import EagerSampler, nll_report, settings_with

PAIRS = (("gmm", "moons"), ("moons", "checkerboard"))
"""Data-to-data transports (source, target)."""
INTERPOLANTS = ("linear", "trig")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"train": {"steps": 30, "batch_size": 128}, "samples": 128, "nll_n": 64, "sde_steps": [4, 8],
             "diffusions": ["0", "0.5", "sin2:1"], "sde_sweep": {"eps": ["0.5"], "more_steps": [16]},
             "traj_steps": 8, "solve": {"solver": "rk4", "steps": 4}},
    "cpu": {"train": {"steps": 3000, "batch_size": 512}, "samples": 4000, "nll_n": 600, "sde_steps": [50, 200, 500],
            "diffusions": ["0", "0.1", "0.5", "1", "2", "sin2:1"],
            "sde_sweep": {"eps": ["1", "2"], "more_steps": [1000, 2000]}, "traj_steps": 32,
            "solve": {"solver": "dopri5"}},
    "gpu": {"train": {"steps": 8000, "batch_size": 4096}, "samples": 10000, "nll_n": 5000,
            "sde_steps": [50, 200, 800, 3200], "diffusions": ["0", "0.1", "0.5", "1", "2", "5", "sin2:1", "sin2:4"],
            "sde_sweep": {"eps": ["1", "2", "5"], "more_steps": [6400, 12800]}, "traj_steps": 64,
            "solve": {"solver": "dopri5"}},
}
"""Per scale: training, sample and test-set sizes, the SDE's steps and diffusion levels, and the sweep that tests
why an SDE misses the ODE: its diffusion levels ``eps`` (each in ``diffusions``) at ``sde_steps`` and
``more_steps``, with the learned field and with the target's exact field."""

DESCRIPTION = "ODE vs SDE sampling, data-to-data transport (linear, trig), likelihood along the path"
NLL_CLOSE = 0.25
"""Nats within which two flows' NLL of the same test set count as the same."""


def trainings(scale: str) -> dict[str, dict[str, Any]]:
    """Every run this experiment trains at ``scale``: key -> TrainConfig options."""
    opts = SIZES[scale]["train"]
    runs = {f"gaussian-{t}-linear": {"data": t, "path": "linear", **opts} for t in ("checkerboard", "moons")}
    runs.update({f"{s}-{t}-{i}": {"data": t, "source": s, "path": i, **opts} for s, t in PAIRS for i in INTERPOLANTS})
    return runs


def intro(settings: dict[str, Any]) -> str:
    """What the experiment does, from its recorded settings."""
    sweep = settings["sde_sweep"]
    return (f"Three parts. ODE against SDE sampling of one field (Gaussian -> checkerboard, linear interpolant): "
            f"the SDE dX = [v + eps/2 score] dt + sqrt(eps) dW takes its score from the velocity and has the ODE's "
            f"marginals at every diffusion level eps ({', '.join(settings['diffusions'])}), so its samples should "
            f"match the ODE's as its steps ({', '.join(map(str, settings['sde_steps']))}) grow; at eps = "
            f"{', '.join(sweep['eps'])} the steps go on to {', '.join(map(str, sweep['more_steps']))}, and the same "
            f"sampler runs the checkerboard's exact field, to tell the learned score's error from the "
            f"discretisation. Data to data: {', '.join(f'{s} -> {t}' for s, t in PAIRS)} with the "
            f"{' and the '.join(INTERPOLANTS)} interpolant, against a Gaussian-source flow trained the same way. "
            f"The likelihood of the target under a data-to-data flow, computed along the path from the source's "
            f"exact density, against the Gaussian-source flow's. " + VERDICTS.format(**settings))


def run(ctx: Context) -> Report:
    size = SIZES[ctx.scale]
    settings = recorded(size)
    report = Report("interpolants", "Stochastic interpolants: ODE vs SDE, data to data, likelihood", ctx.scale,
                    intro=intro(settings), settings=settings)
    ctx.plan("interpolants", 5 + 2 * len(PAIRS) * len(INTERPOLANTS))
    ref = solve_label(size['solve'])
    runs = trainings(ctx.scale)
    base = {t: train(ctx, f"gaussian-{t}-linear", runs[f"gaussian-{t}-linear"]) for t in ("checkerboard", "moons")}
    judges = {t: Judge(run_.data, ctx.seed) for t, run_ in base.items()}
    floors = {t: judge.floor(size["samples"]) for t, judge in judges.items()}
    report.data["floors"] = floors
    _ode_vs_sde(ctx, report, base["checkerboard"], size, judges["checkerboard"], floors["checkerboard"])
    rows, panels, nll_rows = [], {}, []
    base_res = {}
    for t, run_ in base.items():
        ctx.stage(f"evaluate gaussian -> {t}")
        res = base_res[t] = _transport(run_, size, ctx, report.notes, judges[t])
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
            gauss = base_res[target]
            spread = noise(res["quality_spread"], gauss["quality_spread"])
            report.judge(f"the {interp} interpolant transports {source} to {target} as well as a Gaussian source "
                         f"does (no worse by more than {SETTLED:g} x the bootstrap noise)",
                         no_worse(res["quality"], gauss["quality"], spread),
                         "sliced W2 {q} vs {b} from a Gaussian source, noise {s}", q=res["quality"],
                         b=gauss["quality"], s=spread)
            if res["nll"] is not None:
                nll_rows.append([source, target, interp, res["nll"], res["nll_stderr"], res["nll_nfe"]])
                d = None if gauss["nll"] is None else res["nll"] - gauss["nll"]
                se = noise(res["nll_stderr"], gauss["nll_stderr"] or 0.0)
                report.judge(f"the likelihood of {target} along the {interp} path from {source} (its exact density) "
                             f"agrees with the Gaussian-source flow's (within {NLL_CLOSE} nats)",
                             close(d, se, NLL_CLOSE), "NLL {a} vs {b} nats, difference {d} +- {se}", a=res["nll"],
                             b=gauss["nll"], d=d, se=se)
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
                           "quality_spread": 0.0 if res is None else judge.spread(res.x),
                           "nfe": None if res is None else res.nfe, "nll": None, "nll_stderr": None, "nll_nfe": None}
    tr = run_.trainer
    if tr.path.prior.has_log_prob:
        nll = attempt(notes, f"{run_.key} test NLL", lambda: nll_report(ref, data.test[:size["nll_n"]], seed=seed,
                                                                         progress=ctx.progress))
        if nll is not None:
            out.update(nll=nll_value(nll), nll_stderr=nll_stderr(nll), nll_nfe=nll["nfe"])
    out["trajectory"] = trajectory(run_, size["traj_steps"], seed)
    return out


def _ode_vs_sde(ctx: Context, report: Report, run_: Trained, size: dict[str, Any], judge: Judge,
                floor: tuple[float, float]) -> None:
    """SDE samples at each diffusion level and step count against the ODE's (reference solve and Euler); at the
    sweep's levels, more steps and the exact field too (``_sweep``), and why the SDE misses (``explain_sde_gap``)."""
    ctx.stage("ODE vs SDE")
    seed, n = ctx.seed, size["samples"]
    ref = attempt(report.notes, "ODE reference sampling",
                  lambda: run_.sampler(**size["solve"]).sample(n, seed=seed, progress=ctx.progress))
    ode = (None, 0.0) if ref is None else (judge(ref.x), judge.spread(ref.x))
    rows, curves, scatter, series = [], {}, {}, {}
    for steps in size["sde_steps"]:
        euler = judge(run_.sampler(solver="euler", steps=steps).sample(n, seed=seed, progress=False).x)
        _point(curves, "ODE (Euler)", steps, euler)
        for eps in size["diffusions"]:
            x = run_.sampler(diffusion=eps, steps=steps).sample(n, seed=seed, progress=False).x
            series.setdefault(eps, []).append((judge(x), judge.spread(x)))
            rows.append([eps, steps, *series[eps][-1], euler, ode[0]])
            _point(curves, f"SDE eps={eps}", steps, series[eps][-1][0])
            if steps == size["sde_steps"][-1]:
                scatter[f"SDE eps={eps}"] = x
    exact = _sweep(ctx, report, run_, size, judge, series, curves)
    more = size["sde_sweep"]["more_steps"]
    for eps in size["diffusions"]:
        steps = size["sde_steps"] + (more if eps in exact else [])
        (prev, _), (q, spread) = series[eps][-2], series[eps][-1]
        report.judge(f"the SDE with eps = {eps} (score from the velocity) samples the ODE's distribution (no worse "
                     f"by more than {SETTLED:g} x the bootstrap noise)", converged_no_worse(series[eps], *ode),
                     "sliced W2 {p} at {ps} and {q} at {s} Euler-Maruyama steps vs the ODE's {o}, noise {d}",
                     p=prev, ps=steps[-2], q=q, s=steps[-1], o=ode[0], d=noise(spread, ode[1]))
    for eps, exact_series in exact.items():
        steps = size["sde_steps"] + more
        verdict, evidence, values = explain_sde_gap(steps, series[eps], exact_series, ode, floor)
        report.judge(f"the SDE at eps = {eps} misses the ODE's quality only for lack of steps, not for the learned "
                     f"score's error", verdict, evidence, **values)
    report.table("sde", "ODE vs SDE sampling (Gaussian -> checkerboard, linear interpolant)",
                 ["eps", "steps", "SDE sliced W2", "bootstrap spread", "ODE Euler sliced W2",
                  f"ODE {solve_label(size['solve'])} sliced W2"], rows,
                 note=f"{n} samples; eps(t) constant, or sin2:C = C sin^2(pi t); Euler-Maruyama with a final "
                      f"denoising jump; sliced W2 to {REFERENCE_POINTS} fresh data points (floor: see the "
                      f"transport table); the ODE reference's bootstrap spread is {ode[1]:.4g}.")
    ctx.out.mkdir(parents=True, exist_ok=True)
    lines_png(ctx.out / "sde_quality_vs_steps.png", {"Gaussian -> checkerboard": curves}, xlabel="steps",
              ylabel="sliced W2 (lower is better)", logx=True, logy=True)
    report.figure("sde_quality_vs_steps.png", "Sample quality against steps: SDE at each diffusion level (learned "
                  "and exact field) vs ODE Euler")
    last = size["sde_steps"][-1]
    ref_panel = {} if ref is None else {f"ODE ({solve_label(size['solve'])})": ref.x}
    clouds_png(ctx.out / "sde_samples.png", {**ref_panel, **scatter}, title=f"samples at {last} steps")
    report.figure("sde_samples.png", f"ODE and SDE samples ({last} steps)")
    ctx.done()


def _point(curves: dict[str, tuple[list[int], list[float]]], name: str, steps: int, q: float) -> None:
    xs, ys = curves.setdefault(name, ([], []))
    xs.append(steps)
    ys.append(q)


def _sweep(ctx: Context, report: Report, run_: Trained, size: dict[str, Any], judge: Judge,
           series: dict[str, list[tuple[float, float]]], curves: dict[str, tuple[list[int], list[float]]]
           ) -> dict[str, list[tuple[float, float]]]:
    """At each of the sweep's diffusion levels: the learned SDE at ``more_steps`` (appended to ``series``) and the
    same sampler on the checkerboard's exact field at every step count; the exact series, by level."""
    sweep, tr, n = size["sde_sweep"], run_.trainer, size["samples"]
    steps = size["sde_steps"] + sweep["more_steps"]
    field = CheckerboardVelocity(tr.path).to(tr.device)
    rows, exact, diverged = [], {}, []
    for eps in sweep["eps"]:
        for k in sweep["more_steps"]:
            x = run_.sampler(diffusion=eps, steps=k).sample(n, seed=ctx.seed, progress=False).x
            series[eps].append((judge(x), judge.spread(x)))
            _point(curves, f"SDE eps={eps}", k, series[eps][-1][0])
        for k, learned in zip(steps, series[eps]):
            exact_sampler = EagerSampler(field, tr.path, tr.meta, settings_with({"diffusion": eps, "steps": k}))
            x = exact_sampler.sample(n, seed=ctx.seed, progress=False).x
            finite = bool(torch.isfinite(x).all())
            q, spread = (judge(x), judge.spread(x)) if finite else (None, None)
            exact.setdefault(eps, []).append((q, spread or 0.0))
            rows.append([eps, k, *learned, q, spread])
            if finite:
                _point(curves, f"exact field, SDE eps={eps}", k, q)
            else:
                diverged.append(f"eps = {eps}, {k} steps")
    report.table("sde_sweep", "Why the SDE misses: more steps, and the exact field",
                 ["eps", "steps", "learned sliced W2", "learned spread", "exact-field sliced W2", "exact spread"],
                 rows, note=f"The same Euler-Maruyama sampler ({n} samples, same seed) on the learned velocity and "
                            f"on the checkerboard's exact velocity (its score in closed form: a mixture of "
                            f"truncated normals, ``fastfm.experiments.exact``); spreads over bootstrap resamples.")
    report.data["sde_sweep"] = {eps: {"steps": steps, "learned": series[eps], "exact": exact[eps]}
                                for eps in sweep["eps"]}
    if diverged:
        report.notes.append(f"Euler-Maruyama on the checkerboard's exact field diverged (non-finite samples, no "
                            f"quality) at {'; '.join(diverged)}: near t = 1 its exact score is stiff at the squares' "
                            f"edges (of order eps / sigma_t^2 off the support), which the learned field smooths.")
    return exact


def explain_sde_gap(steps: list[int], learned: list[tuple[float, float]],
                    exact: list[tuple[float | None, float]], ode: tuple[float | None, float],
                    floor: tuple[float, float]) -> tuple[Verdict, str, dict[str, Any]]:
    """'The SDE misses the ODE only for lack of steps', judged from (quality, bootstrap spread) of the learned and
    the exact field at each step count (quality None: the samples diverged), the ODE reference's and the data's
    floor (mean, std): true when more steps bring the learned SDE to the ODE, not settled while it still improves,
    false when it has stopped improving short of the ODE. The exact field then names the cause: where the same
    sampler on it reaches the data's floor, the learned score's error. Returns the verdict, the evidence
    sentence (a format string) and its values."""
    (prev, _), (last, _), (e, es) = learned[-2], learned[-1], exact[-1]
    values: dict[str, Any] = {"l": last, "n": steps[-1], "p": prev, "m": steps[-2], "o": ode[0], "e": e,
                              "f": floor[0]}
    if ode[0] is None:
        return Verdict(None, "the ODE reference solve failed"), "learned {l}, exact field {e} at {n} steps", values
    verdict = converged_no_worse(learned, *ode)
    if verdict.holds:
        values["r"] = next(k for k, (q, s) in zip(steps, learned) if no_worse(q, ode[0], noise(s, ode[1])).holds)
        return verdict, ("more steps close the gap: the learned SDE reaches the ODE's quality at {r} steps ({l} at "
                         "{n} vs the ODE's {o}; the exact field {e}, the data's floor {f})"), values
    if verdict.holds is None:
        return verdict, ("the learned SDE still improves, {p} at {m} to {l} at {n} steps, vs the ODE's {o} (the "
                         "exact field {e}, the data's floor {f})"), values
    if e is not None and no_worse(e, floor[0], noise(es, floor[1])).holds:
        return verdict, ("the learned score's error, not the steps: the learned SDE goes from {p} at {m} to {l} at "
                         "{n} steps vs the ODE's {o}, while the same sampler on the exact field reaches the data's "
                         "floor ({e} vs {f})"), values
    return verdict, ("more steps do not help: the learned SDE goes from {p} at {m} to {l} at {n} steps vs the "
                     "ODE's {o}; the exact field does not reach the data's floor either ({e} vs {f}: n/a where its "
                     "samples diverged), so it does not tell the learned score's error from the sampler's"), values
