"""Experiment ``paths``: Flow Matching with the OT path against the diffusion paths (Lipman et al., 2022, Table 1
and Figures 5-7), at small scale; the report's introduction (``intro``) is written from its settings.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from fastfm.data import get_dataset
from fastfm.experiments.common import (MEDIUM_UNET, SMALL_UNET, TINY_UNET, VERDICTS, Context, Trained, attempt,
                                       batched_sample, grids_png, lines_png, nll_stderr, nll_value, recorded,
                                       solve_label, train, trajectories_png, trajectory)
from fastfm.experiments.judges import FLOOR_DRAWS, ImageJudge, Judge, judge_for
from fastfm.experiments.report import Report
from fastfm.experiments.verdicts import bootstrap_std, fewer_nfe, lower, noise
from fastfm.solve.likelihood import bits_per_dim, nll_summary
from fastfm.solve.solvers import solver_of

VARIANTS: dict[str, dict[str, Any]] = {
    "CondOT": {"path": "condot"},
    "VP": {"path": "vp"},
    "VP-eps": {"path": "vp", "target": "x0"},
    "VE": {"path": "ve"},
    "trig": {"path": "trig"},
}
"""The objectives compared, with their TrainConfig options (velocity target unless said): VP-eps is noise
prediction on the VP path (the DDPM / score-matching objective), trig the trigonometric interpolant."""

FIXED_SOLVERS = ("euler", "midpoint", "rk4")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"data": {"checkerboard": {"steps": 30, "batch_size": 128},
                      "digits": {"steps": 6, "batch_size": 32, "model_args": TINY_UNET}},
             "curve_points": 2, "curve_n": 64, "curve_n_image": 4, "nll_n": 64, "nll_n_image": 8, "samples": 128,
             "samples_image": 24, "nfe": [2, 4], "classifier_steps": 20, "traj_steps": 8,
             "solve": {"solver": "rk4", "steps": 4}},
    "cpu": {"data": {"checkerboard": {"steps": 3000, "batch_size": 512},
                     "gmm": {"steps": 3000, "batch_size": 512},
                     "digits": {"steps": 1000, "batch_size": 64, "model_args": SMALL_UNET}},
            "curve_points": 2, "curve_n": 200, "curve_n_image": 32, "nll_n": 400, "nll_n_image": 80, "samples": 5000,
            "samples_image": 300, "nfe": [4, 8, 16, 32], "classifier_steps": 600, "traj_steps": 32,
            "solve": {"solver": "dopri5"}},
    "gpu": {"data": {"checkerboard": {"steps": 8000, "batch_size": 4096},
                     "gmm": {"steps": 8000, "batch_size": 4096},
                     "digits": {"steps": 4000, "batch_size": 256, "model_args": MEDIUM_UNET},
                     "mnist5k": {"steps": 4000, "batch_size": 128, "model_args": MEDIUM_UNET}},
            "curve_points": 8, "curve_n": 2000, "curve_n_image": 200, "nll_n": 5000, "nll_n_image": 1000,
            "samples": 10000, "samples_image": 2000, "nfe": [2, 4, 8, 16, 32, 64, 128], "classifier_steps": 2000,
            "traj_steps": 64, "solve": {"solver": "dopri5"}},
}
"""Per scale: steps and batch per data set (the same for every path), evaluation sizes, the NFE of the sweep."""

DESCRIPTION = "CondOT vs VP (velocity) vs VP noise prediction vs VE vs trig: NLL, NFE, sample quality, bend"


def trainings(scale: str) -> dict[str, dict[str, Any]]:
    """Every run this experiment trains at ``scale``: key -> TrainConfig options."""
    return {f"{d}-{name}": {"data": d, **options, **variant}
            for d, options in SIZES[scale]["data"].items() for name, variant in VARIANTS.items()}


def intro(settings: dict[str, Any]) -> str:
    """What the experiment trains and measures, from its recorded settings."""
    ref, nfe = solve_label(settings["solve"]), ", ".join(map(str, settings["nfe"]))
    return (f"Each data set ({', '.join(settings['data'])}) trains the same model with the same steps, batch and "
            f"seed on each objective: {', '.join(VARIANTS)} (the velocity target but for VP-eps, noise prediction on "
            f"the VP path: the DDPM / score-matching objective; trig: the trigonometric interpolant from a "
            f"Gaussian). Measured: test NLL ({ref}) along training and at the end, the NFE of sampling with it, "
            f"sample quality (sliced W2 for vectors, the classifier Fréchet distance for images) against NFE "
            f"{nfe} for {', '.join(FIXED_SOLVERS)}, how far the trajectories bend, training wall time. "
            + VERDICTS.format(**settings))


def run(ctx: Context) -> Report:
    size, runs = SIZES[ctx.scale], trainings(ctx.scale)
    datasets = size["data"]
    images = [d for d in datasets if d in ("digits", "mnist5k")]
    ctx.plan("paths", len(datasets) * len(VARIANTS) * 2 + len(images))
    settings = recorded(size)
    report = Report("paths", "Flow Matching paths: OT vs diffusion", ctx.scale, intro=intro(settings),
                    settings=settings)
    rows, floors, claims_by_data, curves, sweeps, trajs, grids, levels = [], [], {}, {}, {}, {}, {}, {}
    for data_name, options in datasets.items():
        if data_name in images:
            ctx.stage(f"classifier {data_name}")
        judge = judge_for(get_dataset(data_name, seed=ctx.seed), ctx.seed, size["classifier_steps"], ctx.progress)
        if isinstance(judge, ImageJudge):
            report.data.setdefault("classifier_test_accuracy", {})[data_name] = judge.test_accuracy
            ctx.done()
        n = size["samples_image"] if data_name in images else size["samples"]
        floor = judge.floor(n)
        floors.append([data_name, n, *floor])
        results = {}
        for name in VARIANTS:
            run_ = train(ctx, f"{data_name}-{name}", runs[f"{data_name}-{name}"],
                         evaluate=_curve_nll(size, ctx, report.notes),
                         every=max(options["steps"] // size["curve_points"], 1))
            ctx.stage(f"evaluate {data_name}-{name}")
            results[name] = _evaluate(run_, size, ctx, judge, report.notes)
            ctx.done()
            kind = "grid" if run_.data.kind == "image" else "trajectory"
            (grids if kind == "grid" else trajs).setdefault(data_name, {})[name] = results[name].pop(kind)
            levels[data_name] = run_.data.levels
        for name, r in results.items():
            rows.append([data_name, name, r["nll"], r["nll_stderr"], r["nll_unit"], r["nll_nfe"], r["sample_nfe"],
                         r["quality"], r["quality_at"]["midpoint"][str(size["nfe"][1])], r["bend"],
                         r["train_s"]])
        curves[data_name] = {name: r["curve"] for name, r in results.items()}
        sweeps[data_name] = {name: r["quality_at"] for name, r in results.items()}
        claims_by_data[data_name] = results
        report.data.setdefault("floors", {})[data_name] = floor
    report.data.update(results=claims_by_data)
    ref = solve_label(size["solve"])
    quality_name = "classifier Fréchet distance (images), sliced W2 (2D)"
    report.table("main", "Test NLL, NFE, sample quality, bend, training time",
                 ["data", "path", "test NLL", "stderr", "unit", f"NLL NFE ({ref})", f"sample NFE ({ref})",
                  f"quality ({ref})", f"quality (midpoint, NFE {size['nfe'][1]})", "bend S/K", "train s"], rows,
                 note=f"NLL and NFE with {ref} (exact divergence in 2D, Hutchinson for "
                      f"images); sample NFE: the mean over the {settings['nfe_batches']} batches of the sampling "
                      f"solve; quality: {quality_name}, lower is better; bend S/K: the share of the "
                      f"kinetic energy K = int |v|^2 dt off the straight line, S = int |v - (x1 - x0)|^2 dt (Liu "
                      f"et al.'s straightness), of the RK4 solve: 0 for straight trajectories; train s: training "
                      f"wall time without the evaluations along the way.")
    report.table("floor", "Sample quality of the data itself (the floor)", ["data", "points", "mean", "std"], floors,
                 note=f"The quality measure for {FLOOR_DRAWS} fresh draws of as many data points as the samples: "
                      f"a sampler cannot do better than the mean.")
    _claims(report, claims_by_data, size)
    for by in claims_by_data.values():  # the per-point NLLs behind the paired claims stay out of the JSON
        for r in by.values():
            for entry in (r, *r["curve"]):
                entry.pop("points")
    _figures(report, ctx, curves, sweeps, trajs, grids, levels, size)
    if "mnist5k" not in datasets:
        report.notes.append("MNIST-5k runs only at `--scale gpu`: at this scale a UNet on 28x28 images does not "
                            "train within the CPU budget.")
    report.notes.append("The paper's numbers (CIFAR-10: FM-OT 2.99 bits/dim, 142 NFE; FM-diffusion 3.10, 183; "
                        "DDPM 3.12, 274; score matching 3.16, 242) are at GPU scale on other data; only the "
                        "orderings are compared here.")
    ctx.close()
    return report


def _curve_nll(size: dict[str, Any], ctx: Context, notes: list[str]) -> Callable[[Trained, int], dict[str, Any]]:
    """The evaluation along training: test NLL of the EMA model on the first ``curve_n`` test points (the same
    points at every step and for every path, so that paths compare pairwise)."""
    def evaluate(run_: Trained, step: int) -> dict[str, Any]:
        n = size["curve_n"] if run_.data.kind == "vector" else size["curve_n_image"]
        nll, points = held_out_nll(run_, size, ctx, notes, n, f"{run_.key} test NLL at step {step}", progress=False)
        return {"nll": None if nll is None else nll_value(nll), "nfe": None if nll is None else nll["nfe"],
                "points": points}
    return evaluate


def held_out_nll(run_: Trained, size: dict[str, Any], ctx: Context, notes: list[str], n: int, what: str,
                 progress: bool) -> tuple[dict[str, Any] | None, Tensor | None]:
    """The NLL summary (``nll_summary``) and per-point NLLs of the first n test points under the reference
    solve, or (None, None) with a note where the solve fails."""
    data = run_.data
    lik = attempt(notes, what, lambda: run_.sampler(**size["solve"]).log_likelihood(data.test[:n], seed=ctx.seed,
                                                                                     progress=progress))
    if lik is None:
        return None, None
    return nll_summary(lik.log_prob, math.prod(data.shape), data.levels, nfe=lik.nfe), per_point_nll(lik.log_prob,
                                                                                                     data)


def _evaluate(run_: Trained, size: dict[str, Any], ctx: Context, judge: Judge,
              notes: list[str]) -> dict[str, Any]:
    data, seed = run_.data, ctx.seed
    image = data.kind == "image"
    n_nll = size["nll_n_image"] if image else size["nll_n"]
    n = size["samples_image"] if image else size["samples"]
    low = size["nfe"][0]
    nll, points = held_out_nll(run_, size, ctx, notes, n_nll, f"{run_.key} test NLL", ctx.progress)
    adaptive = attempt(notes, f"{run_.key} sampling", lambda: batched_sample(run_, size["solve"], n, seed,
                                                                             ctx.progress))
    quality_at: dict[str, dict[str, float]] = {}
    for solver in FIXED_SOLVERS:
        quality_at[solver] = {}
        for nfe in size["nfe"]:
            steps = nfe // solver_of(solver).stages
            if steps >= 1:
                res = run_.sampler(solver=solver, steps=steps).sample(n, seed=seed, progress=False)
                quality_at[solver][str(nfe)] = judge(res.x)
                if solver == "euler" and nfe == low:
                    euler_low_spread = judge.spread(res.x)
    straight = run_.sampler(solver="rk4", steps=size["traj_steps"]).sample(n, seed=seed, transport=True,
                                                                            progress=False)
    unit = "bits/dim" if data.levels else "nats"
    energies = torch.stack([straight.straightness, straight.kinetic], 1).double()
    out = {"nll": None if nll is None else nll_value(nll), "nll_unit": unit,
           "nll_stderr": None if nll is None else nll_stderr(nll),
           "nll_nfe": None if nll is None else nll["nfe"],
           "sample_nfe": None if adaptive is None else sum(adaptive[1]) / len(adaptive[1]),
           "sample_nfes": None if adaptive is None else adaptive[1],
           "quality": None if adaptive is None else judge(adaptive[0]),
           "quality_spread": None if adaptive is None else judge.spread(adaptive[0]),
           "quality_at": quality_at, "euler_low_spread": euler_low_spread,
           "bend": _bend(energies), "bend_spread": bootstrap_std(_bend, energies, seed),
           "kinetic": float(straight.kinetic.mean()),
           "train_s": run_.wall_s, "curve": run_.curve,
           "points": points}
    if image:
        out["grid"] = (straight.x if adaptive is None else adaptive[0])[:64]
    else:
        out["trajectory"] = trajectory(run_, size["traj_steps"], seed)
    return out


def _bend(energies: Tensor) -> float:
    """S/K of per-sample (straightness S, kinetic energy K) rows: the share of K off the straight line."""
    return float(energies[:, 0].mean() / energies[:, 1].mean())


def _claims(report: Report, results: dict[str, dict[str, Any]], size: dict[str, Any]) -> None:
    """Each ordering of the paper, per data set, with its numbers (rules: ``fastfm.experiments.verdicts``)."""
    low, ref, solver = str(size["nfe"][0]), solve_label(size["solve"]), size["solve"]["solver"]
    for data, r in results.items():
        ot, vp, eps = r["CondOT"], r["VP"], r["VP-eps"]
        unit = ot["nll_unit"]
        nll_claim(report, f"{data}: FM-OT reaches a lower test NLL than FM-diffusion (VP, velocity)",
                   ("CondOT", ot), ("VP", vp), unit)
        nll_claim(report, f"{data}: FM-diffusion (VP, velocity) reaches a lower test NLL than noise prediction "
                   "on the same path (DDPM / score-matching objective)", ("VP", vp), ("VP-eps", eps), unit)
        for claim, (na, a), (nb, b) in ((f"{data}: FM-OT samples with fewer {ref} NFE than FM-diffusion",
                                         ("CondOT", ot), ("VP", vp)),
                                        (f"{data}: FM-diffusion samples with fewer {ref} NFE than noise prediction",
                                         ("VP", vp), ("VP-eps", eps))):
            report.judge(claim, fewer_nfe(a["sample_nfes"], b["sample_nfes"], solver),
                         f"{na} {{a}} vs {nb} {{b}} NFE per batch", a=a["sample_nfe"], b=b["sample_nfe"])
        _lower_claim(report, f"{data}: FM-OT gives better samples than FM-diffusion ({ref})", "quality",
                     ot["quality"], vp["quality"], noise(ot["quality_spread"] or 0.0, vp["quality_spread"] or 0.0))
        mid = len(ot["curve"]) // 2 - 1
        if mid >= 0:
            a, b = ot["curve"][mid], vp["curve"][mid]
            nll_claim(report, f"{data}: FM-OT trains faster (lower test NLL half-way through training, at step "
                       f"{a['step']})", ("CondOT", a), ("VP", b), unit)
        _lower_claim(report, f"{data}: with few fixed steps OT degrades less (Euler, NFE {low})", "quality",
                     ot["quality_at"]["euler"][low], vp["quality_at"]["euler"][low],
                     noise(ot["euler_low_spread"], vp["euler_low_spread"]))
        _lower_claim(report, f"{data}: OT trajectories are straighter", "bend S/K", ot["bend"], vp["bend"],
                     noise(ot["bend_spread"], vp["bend_spread"]))


def _lower_claim(report: Report, claim: str, what: str, a: float | None, b: float | None, spread: float) -> None:
    """"CondOT's measure is lower than VP's", settled beyond SETTLED x the bootstrap noise of the difference."""
    report.judge(claim, lower(a, b, spread), f"{what} CondOT {{a}} vs VP {{b}}, bootstrap noise {{s}}", a=a, b=b,
                 s=spread)


def per_point_nll(log_prob: Tensor, data: Any) -> Tensor:
    """Each test point's NLL in the report's unit: bits/dim for discrete data, else nats."""
    return -log_prob if data.levels is None else bits_per_dim(log_prob, math.prod(data.shape), data.levels)


def nll_claim(report: Report, claim: str, first: tuple[str, dict[str, Any]], second: tuple[str, dict[str, Any]],
               unit: str) -> None:
    """"first has the lower NLL", judged on the paired per-point differences ("points") of the same test points:
    settled (True or False) when the mean difference is more than SETTLED standard errors from 0, else None."""
    (na, a), (nb, b) = first, second
    if a["points"] is None or b["points"] is None:
        report.claim(claim, None, f"{na} {{a}} vs {nb} {{b}}: a likelihood solve failed", a=a["nll"], b=b["nll"])
        return
    d = (a["points"] - b["points"]).double()
    mean, se = float(d.mean()), float(d.std() / math.sqrt(len(d)))
    report.judge(claim, lower(mean, 0.0, se), f"{na} {{a}} vs {nb} {{b}} {unit}, paired difference {{d}} +- {{se}}",
                 a=a["nll"], b=b["nll"], d=mean, se=se)


def _figures(report: Report, ctx: Context, curves: dict, sweeps: dict, trajs: dict, grids: dict, levels: dict,
             size: dict[str, Any]) -> None:
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    panels = {d: {name: ([c["step"] for c in cs], [c["nll"] for c in cs]) for name, cs in by.items()}
              for d, by in curves.items()}
    lines_png(out / "nll_vs_step.png", panels, xlabel="training step", ylabel="test NLL (nats; bits/dim for images)")
    ref = solve_label(size["solve"])
    report.figure("nll_vs_step.png", f"Test NLL ({ref}) of the EMA model along training, per path")
    for solver in FIXED_SOLVERS:
        panels = {d: {name: ([int(k) for k in q[solver]], list(q[solver].values())) for name, q in by.items()}
                  for d, by in sweeps.items()}
        lines_png(out / f"quality_vs_nfe_{solver}.png", panels, xlabel="NFE", ylabel="sample quality (lower is better)",
                  logx=True, logy=True, title=solver)
        report.figure(f"quality_vs_nfe_{solver}.png", f"Sample quality against NFE with {solver}, per path")
    for d, by in trajs.items():
        trajectories_png(out / f"trajectories_{d}.png", {name: t[..., :2] for name, t in by.items()},
                         title=f"{d}: RK4 x {size['traj_steps']} trajectories from the source to the data")
        report.figure(f"trajectories_{d}.png", f"{d}: trajectories per path (straight for OT, curved for VP/VE)")
    for d, by in grids.items():
        grids_png(out / f"samples_{d}.png", by, levels[d], title=f"{d}: {ref} samples")
        report.figure(f"samples_{d}.png", f"{d}: samples per path ({ref})")
