"""Experiment ``fewstep``: one- and few-step generation, at small scale: a flow-matching teacher sampled by ODE
solvers at 1 to 32 calls against reflow (2-rectified flow++, Lee et al., 2024), MeanFlow (Geng et al., 2025) and
shortcut models (Frans et al., 2024), with the whole training cost of each; the report's introduction (``intro``) is
written from its settings.

MeanFlow trains from scratch: while this experiment was sized, distilling it from the teacher (``init``) reached a
worse one-call sliced W2 on the checkerboard and no better one-call Fréchet distance on digits than training from
scratch, at a higher total cost (the teacher's training added).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import Tensor

from fastfm.data import get_dataset
from fastfm.evaluation.metrics import energy_distance
from fastfm.experiments.common import (MEDIUM_UNET, TINY_UNET, VERDICTS, Context, Trained, attempt, batched_sample,
                                       clouds_png, grids_png, lines_png, recorded, solve_label, train,
                                       trajectories_png, trajectory)
from fastfm.experiments.judges import FLOOR_DRAWS, Judge, judge_for
from fastfm.experiments.report import Report
from fastfm.experiments.verdicts import bootstrap_std, lower, noise
from fastfm.solve.solvers import FLOW_MAP, solver_of
from fastfm.training.reflow import generate_pairs

NFE = (1, 2, 4, 8, 16, 32)
"""Model calls per sample of the sweep."""
STUDENTS: dict[str, dict[str, Any]] = {
    "reflow": {"time_sampler": "u-shaped", "loss": "pseudo-huber"},
    "meanflow": {"objective": "meanflow", "time_sampler": "logit-normal",
                 "time_sampler_args": {"mean": 0.4, "std": 1.0}},
    "shortcut": {"objective": "shortcut"},
}
"""The few-step methods' TrainConfig options beyond the teacher's (same model, batch, data). Reflow also trains on
the teacher's pairs (``data="reflow:DIR"``) from the teacher's weights (``init``): 2-rectified flow++. MeanFlow's
times lean toward the data (t = 1 here; the paper's mean -0.4 in its reversed time)."""
SWEEP: dict[str, tuple[str, str]] = {
    **{f"teacher {solver}": ("teacher", solver) for solver in ("euler", "midpoint", "rk4")},
    "reflow euler": ("reflow", "euler"), "meanflow": ("meanflow", FLOW_MAP), "shortcut": ("shortcut", FLOW_MAP),
}
"""Each line of the sweep: label -> (run, solver)."""
ODE_LINES = ("teacher euler", "teacher midpoint", "teacher rk4")
GOALS = {1: 1.5, 2: 1.2}
"""2D goals: the best method at this many calls reaches a sliced W2 within this factor of the teacher's reference."""
IMAGE_GOAL, IMAGE_REF_NFE = 2.0, 32
"""Image goal: one call within this factor of the Fréchet distance of the teacher's best ODE solve at 32 calls."""

MLP_CPU, MLP_GPU = {"hidden": 128, "depth": 3}, {"hidden": 256, "depth": 4}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"data": {"checkerboard": {"train": {"batch_size": 64, "model_args": {"hidden": 16, "depth": 2}},
                                       "steps": {"teacher": 30, "reflow": 10, "meanflow": 20, "shortcut": 20},
                                       "pairs": 256},
                      "digits": {"train": {"batch_size": 16, "model_args": TINY_UNET},
                                 "steps": {"teacher": 4, "reflow": 2, "meanflow": 2, "shortcut": 2}, "pairs": 32}},
             "samples": 128, "samples_image": 24, "classifier_steps": 20, "traj_steps": 4,
             "solve": {"solver": "rk4", "steps": 4}, "pair_solve": {"solver": "rk4", "steps": 2}},
    "cpu": {"data": {"checkerboard": {"train": {"batch_size": 512, "model_args": MLP_CPU},
                                      "steps": {"teacher": 2000, "reflow": 600, "meanflow": 2000, "shortcut": 2000},
                                      "pairs": 10000},
                     "gmm": {"train": {"batch_size": 512, "model_args": MLP_CPU},
                             "steps": {"teacher": 1000, "reflow": 400, "meanflow": 1000, "shortcut": 1000},
                             "pairs": 10000},
                     "digits": {"train": {"batch_size": 64, "model_args": TINY_UNET},
                                "steps": {"teacher": 800, "reflow": 300, "meanflow": 600, "shortcut": 600},
                                "pairs": 2000}},
            "samples": 4000, "samples_image": 500, "classifier_steps": 600, "traj_steps": 8,
            "solve": {"solver": "dopri5"}, "pair_solve": {"solver": "rk4", "steps": 8}},
    "gpu": {"data": {"checkerboard": {"train": {"batch_size": 4096, "model_args": MLP_GPU},
                                      "steps": {"teacher": 8000, "reflow": 3000, "meanflow": 8000, "shortcut": 8000},
                                      "pairs": 50000},
                     "gmm": {"train": {"batch_size": 4096, "model_args": MLP_GPU},
                             "steps": {"teacher": 5000, "reflow": 2000, "meanflow": 5000, "shortcut": 5000},
                             "pairs": 50000},
                     "digits": {"train": {"batch_size": 256, "model_args": MEDIUM_UNET},
                                "steps": {"teacher": 4000, "reflow": 1500, "meanflow": 3000, "shortcut": 3000},
                                "pairs": 20000}},
            "samples": 10000, "samples_image": 2000, "classifier_steps": 2000, "traj_steps": 32,
            "solve": {"solver": "dopri5"}, "pair_solve": {"solver": "dopri5"}},
}
"""Per scale and data set: the model and batch every method shares, each method's steps, the reflow pairs; then
the evaluation sizes, the reference solve and the teacher's solve behind the pairs. The gpu scale is sized for one
GPU, not measured (no GPU was lent)."""

DESCRIPTION = "one and few calls: the ODE teacher (euler, midpoint, rk4, dopri5) vs reflow, MeanFlow, shortcut"


def trainings(scale: str, root: Path) -> dict[str, dict[str, Any]]:
    """Every run this experiment trains at ``scale`` into the experiment folder ``root``: key -> TrainConfig
    options (a reflow run reads ``root``'s pairs and the teacher's weights, written before it trains)."""
    runs = {}
    for d, options in SIZES[scale]["data"].items():
        runs[f"{d}-teacher"] = {"data": d, "steps": options["steps"]["teacher"], **options["train"]}
        for name, extra in STUDENTS.items():
            runs[f"{d}-{name}"] = {"data": d, "steps": options["steps"][name], **options["train"], **extra}
        runs[f"{d}-reflow"].update(data=f"reflow:{pairs_dir(root, d)}", init=str(run_dir(root, f"{d}-teacher")))
    return runs


def run_dir(root: Path, key: str) -> Path:
    """Where ``common.train`` saves the run ``key``."""
    return root / "runs" / key


def pairs_dir(root: Path, data: str) -> Path:
    return root / "pairs" / data


def settings_at(solver: str, nfe: int) -> dict[str, Any] | None:
    """The solve of ``solver`` at ``nfe`` calls: steps = nfe / calls per step, None where that is no whole step."""
    stages = solver_of(solver).stages
    return None if nfe % stages else {"solver": solver, "steps": nfe // stages}


def intro(settings: dict[str, Any]) -> str:
    """What the experiment trains and measures, from its recorded settings."""
    ref, pairs = solve_label(settings["solve"]), solve_label(settings["pair_solve"])
    goals = " and ".join(f"within {r:g}x at {k} call{'s' * (k > 1)}" for k, r in settings["goals"].items())
    return (f"Each data set ({', '.join(settings['data'])}) trains one model size and batch for every method. The "
            f"teacher (conditional flow matching) samples with euler, midpoint and rk4 at "
            f"{', '.join(map(str, settings['nfe']))} calls (NFE; steps = NFE / calls per step) and with {ref}, the "
            f"reference. Reflow (2-rectified flow++): pairs (x0, X_0->1(x0)) of the teacher by {pairs}, a student "
            f"initialised from the teacher and trained on them with u-shaped times and the pseudo-Huber loss, sampled "
            f"by Euler. MeanFlow (average velocity from one JVP, logit-normal times, from scratch) and a shortcut "
            f"model sample with their map, one call per step. Measured: sample quality against calls (sliced W2 to "
            f"fresh data and energy distance to the test set in 2D, the classifier Fréchet distance for images), "
            f"the straightness and kinetic energy of the teacher's and the reflowed model's trajectories, and each "
            f"method's whole training cost (reflow's includes the teacher and the pairs). Goals, each for the best "
            f"line of the sweep at that many calls: in 2D a sliced W2 {goals} of the reference's; for images, at "
            f"one call, a Fréchet distance within {settings['image_goal']:g}x of the teacher's best ODE solve at "
            f"{settings['image_ref_nfe']} calls. "
            + VERDICTS.format(**settings))


def run(ctx: Context) -> Report:
    size = SIZES[ctx.scale]
    datasets = {d: get_dataset(d, seed=ctx.seed) for d in size["data"]}
    images = [d for d, data in datasets.items() if data.kind == "image"]
    ctx.plan("fewstep", len(datasets) * (3 + len(STUDENTS)) + len(images))
    settings = recorded({**size, "nfe": list(NFE), "goals": GOALS, "image_goal": IMAGE_GOAL,
                         "image_ref_nfe": IMAGE_REF_NFE, "students": STUDENTS, "floor_draws": FLOOR_DRAWS})
    report = Report("fewstep", "One and few calls: reflow, MeanFlow and shortcut models against the ODE",
                    ctx.scale, intro=intro(settings), settings=settings)
    options = trainings(ctx.scale, ctx.out)
    results: dict[str, dict[str, Any]] = {}
    shown: dict[str, dict[str, Tensor]] = {}
    trajs: dict[str, dict[str, Tensor]] = {}
    for d, data in datasets.items():
        if d in images:
            ctx.stage(f"classifier {d}")
        judge = judge_for(data, ctx.seed, size["classifier_steps"], ctx.progress)
        if d in images:
            report.data.setdefault("classifier_test_accuracy", {})[d] = judge.test_accuracy
            ctx.done()
        runs, cost = _train_all(ctx, d, options, size)
        ctx.stage(f"evaluate {d}")
        results[d], shown[d] = _evaluate(ctx, runs, judge, size, report.notes)
        results[d].update(cost=cost, floor=judge.floor(size["samples_image" if d in images else "samples"]))
        if d not in images:
            trajs[d] = {k: trajectory(runs[k], size["traj_steps"], ctx.seed) for k in ("teacher", "reflow")}
        ctx.done()
    report.data["results"] = results
    _tables(report, results, size)
    _claims(report, results)
    _figures(report, ctx.out, results, shown, trajs, {d: datasets[d].levels for d in images}, size)
    ctx.close()
    return report


def _train_all(ctx: Context, data: str, options: dict[str, dict[str, Any]],
               size: dict[str, Any]) -> tuple[dict[str, Trained], dict[str, float]]:
    """The teacher, its pairs and the students of one data set; the training seconds of each (pairs: generation)."""
    teacher = train(ctx, f"{data}-teacher", options[f"{data}-teacher"])
    ctx.stage(f"reflow pairs {data}")
    started = time.perf_counter()
    generate_pairs(run_dir(ctx.out, f"{data}-teacher"), pairs_dir(ctx.out, data),
                   n=size["data"][data]["pairs"], seed=ctx.seed, device=ctx.device, force=True,
                   progress=ctx.progress, **size["pair_solve"])
    cost = {"teacher": teacher.wall_s, "pairs": time.perf_counter() - started}
    ctx.done()
    runs = {"teacher": teacher}
    for name in STUDENTS:
        runs[name] = train(ctx, f"{data}-{name}", options[f"{data}-{name}"])
        cost[name] = runs[name].wall_s
    return runs, cost


def total_cost(cost: dict[str, float], method: str) -> float:
    """A method's whole training cost: its own, and reflow's teacher and pairs."""
    return cost[method] + (cost["teacher"] + cost["pairs"] if method == "reflow" else 0.0)


def _evaluate(ctx: Context, runs: dict[str, Trained], judge: Judge, size: dict[str, Any],
              notes: list[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Quality at every NFE of every line of the sweep (and energy distance for vectors), the bootstrap spreads of
    the sample sets the goals and claims compare, the reference solve, the teacher's and the reflowed model's
    transport; with the one-call samples (and the reference's) for the figures."""
    data, seed = runs["teacher"].data, ctx.seed
    image = data.kind == "image"
    n = size["samples_image" if image else "samples"]
    quality: dict[str, dict[str, float | None]] = {}
    energy: dict[str, dict[str, float | None]] = {}
    kept: dict[tuple[str, int], Tensor] = {}
    for label, (key, solver) in SWEEP.items():
        quality[label], energy[label] = {}, {}
        for nfe in NFE:
            solve = settings_at(solver, nfe)
            if solve is None:
                quality[label][str(nfe)] = energy[label][str(nfe)] = None
                continue
            x = runs[key].sampler(**solve).sample(n, seed=seed, progress=False).x
            quality[label][str(nfe)] = judge(x)
            energy[label][str(nfe)] = None if image else float(energy_distance(x.flatten(1), data.test))
            if nfe in (*GOALS, IMAGE_REF_NFE):
                kept[label, nfe] = x
    out: dict[str, Any] = {"measure": "classifier Fréchet distance" if image else "sliced W2", "quality": quality,
                           "energy": energy, "spread": {}}
    compared = {(label, 1) for label in SWEEP if quality[label]["1"] is not None}
    compared |= {(best_at(out, k)[0], k) for k in GOALS}
    if image:
        compared.add((best_at(out, IMAGE_REF_NFE, ODE_LINES)[0], IMAGE_REF_NFE))
    for label, nfe in sorted(compared):
        out["spread"].setdefault(label, {})[str(nfe)] = judge.spread(kept[label, nfe])
    shown = {f"{label} x 1": kept[label, 1] for label in SWEEP if (label, 1) in kept}
    ref = attempt(notes, f"{runs['teacher'].key} reference solve",
                  lambda: batched_sample(runs["teacher"], size["solve"], n, seed, ctx.progress))
    out["reference"] = None
    if ref is not None:
        x, nfes = ref
        shown[f"teacher {solve_label(size['solve'])}"] = x
        out["reference"] = {"quality": judge(x), "spread": judge.spread(x), "nfe": sum(nfes) / len(nfes),
                            "nfes": nfes, "energy": None if image else float(energy_distance(x.flatten(1), data.test))}
    out["transport"] = {k: _transport(runs[k], size, seed, n) for k in ("teacher", "reflow")}
    return out, shown


def _transport(run_: Trained, size: dict[str, Any], seed: int, n: int) -> dict[str, float]:
    """Straightness S and kinetic energy K (means over n RK4 trajectories) with their bootstrap spreads."""
    res = run_.sampler(solver="rk4", steps=size["traj_steps"]).sample(n, seed=seed, transport=True, progress=False)
    out: dict[str, float] = {}
    for name, values in (("straightness", res.straightness), ("kinetic", res.kinetic)):
        v = values.double()
        out[name], out[f"{name}_spread"] = float(v.mean()), bootstrap_std(_mean, v, seed)
    return out


def _mean(rows: Tensor) -> float:
    return float(rows.mean())


def best_at(r: dict[str, Any], nfe: int, lines: tuple[str, ...] = tuple(SWEEP)) -> tuple[str, float]:
    """The line with the lowest measure at ``nfe`` calls among ``lines`` (those that reach it), and that measure."""
    at = {label: r["quality"][label][str(nfe)] for label in lines if r["quality"][label][str(nfe)] is not None}
    label = min(at, key=at.__getitem__)
    return label, at[label]


def _tables(report: Report, results: dict[str, dict[str, Any]], size: dict[str, Any]) -> None:
    ref = solve_label(size["solve"])
    rows = []
    for d, r in results.items():
        for label in SWEEP:
            rows.append([d, label, r["measure"], *(r["quality"][label][str(k)] for k in NFE)])
            if r["measure"] == "sliced W2":
                rows.append([d, label, "energy distance", *(r["energy"][label][str(k)] for k in NFE)])
    report.table("quality", "Sample quality against calls (NFE)",
                 ["data", "method", "measure", *(f"NFE {k}" for k in NFE)], rows,
                 note=f"{size['samples']} samples in 2D ({size['samples_image']} images), the same prior draws for "
                      f"every method; lower is better. Sliced W2: to fresh data (as every experiment measures it); "
                      f"energy distance: to the held-out test set; images: the classifier Fréchet distance to the "
                      f"test images.")
    report.notes.append("n/a in the quality table: a midpoint step takes 2 calls and an rk4 step 4, so they have no "
                        "solve at fewer calls; in the reference table: no energy distance for images.")
    report.notes.append("MeanFlow trains from scratch: in trials while this experiment was sized, distilling it from "
                        "the teacher (initialised from its weights) gave no better one-call samples, at a higher "
                        "total cost (the teacher's training added).")
    ref_rows = []
    for d, r in results.items():
        x = r["reference"] or {}
        ref_rows.append([d, r["measure"], x.get("quality"), x.get("spread"), x.get("nfe"), x.get("energy"),
                         *r["floor"]])
    report.table("reference", f"The teacher's reference solve ({ref})",
                 ["data", "measure", "value", "bootstrap spread", "NFE (mean of batches)", "energy distance",
                  "data floor", "floor std"], ref_rows,
                 note=f"Floor: the measure for {FLOOR_DRAWS} fresh draws of as many data points (mean, std), the "
                      f"best a sampler can show.")
    cost_rows = [[d, m, r["cost"][m], r["cost"]["teacher"] if m == "reflow" else 0.0,
                  r["cost"]["pairs"] if m == "reflow" else 0.0, total_cost(r["cost"], m)]
                 for d, r in results.items() for m in ("teacher", *STUDENTS)]
    report.table("cost", "Training cost (seconds)", ["data", "method", "own training", "teacher", "pairs", "total"],
                 cost_rows, note="Wall time on this machine: training steps (evaluations left out) and, for reflow, "
                                 "the teacher's training and the generation of its pairs.")
    t_rows = [[d, k, t["straightness"], t["kinetic"], t["straightness"] / t["kinetic"]]
              for d, r in results.items() for k, t in r["transport"].items()]
    report.table("transport", f"What reflow did: trajectories (RK4 x {size['traj_steps']})",
                 ["data", "model", "straightness S", "kinetic energy K", "S/K"], t_rows,
                 note="S = E int |v - (x1 - x0)|^2 dt (0 for straight paths), K = E int |v|^2 dt, per sample "
                      "(summed over dimensions), means over the samples' trajectories.")


def _claims(report: Report, results: dict[str, dict[str, Any]]) -> None:
    """The goals, the students' one call against the teacher's, what reflow did, per data set (rules:
    ``fastfm.experiments.verdicts``)."""
    for d, r in results.items():
        ref = r["reference"]
        if r["measure"] == "sliced W2":
            for calls, ratio in GOALS.items():
                _goal(report, r, f"{d}: {calls} call{'s' * (calls > 1)} reach{'es' * (calls == 1)} a sliced W2 "
                      f"within {ratio:g}x of the teacher's reference solve", calls, ratio,
                      None if ref is None else ref["quality"], 0.0 if ref is None else ref["spread"])
        else:
            line, base = best_at(r, IMAGE_REF_NFE, ODE_LINES)
            _goal(report, r, f"{d}: one call reaches a {r['measure']} within {IMAGE_GOAL:g}x of the teacher's best "
                  f"{IMAGE_REF_NFE}-call ODE solve ({line})", 1, IMAGE_GOAL, base,
                  r["spread"][line][str(IMAGE_REF_NFE)])
        euler, euler_s = r["quality"]["teacher euler"]["1"], r["spread"]["teacher euler"]["1"]
        for label in ("reflow euler", "meanflow", "shortcut"):
            q, s = r["quality"][label]["1"], noise(r["spread"][label]["1"], euler_s)
            report.judge(f"{d}: one call of {label} beats one Euler call of the teacher", lower(q, euler, s),
                         "{a} vs {b}, bootstrap noise {s}", a=q, b=euler, s=s)
        t, f = r["transport"]["teacher"], r["transport"]["reflow"]
        s = noise(t["straightness_spread"], f["straightness_spread"])
        report.judge(f"{d}: reflow straightens the teacher's trajectories (lower straightness S)",
                     lower(f["straightness"], t["straightness"], s),
                     "S {a} reflowed vs {b} teacher, bootstrap noise {s}", a=f["straightness"], b=t["straightness"],
                     s=s)


def _goal(report: Report, r: dict[str, Any], claim: str, calls: int, ratio: float, base: float | None,
          base_spread: float) -> None:
    """'the best line at ``calls`` calls is below ratio x base', settled beyond the noise of both."""
    line, q = best_at(r, calls)
    bound = None if base is None else ratio * base
    s = noise(r["spread"][line][str(calls)], ratio * base_spread)
    report.judge(claim, lower(q, bound, s), "best at {k}: {m} {a} vs {x} x {b} = {c}, bootstrap noise {s}", k=calls,
                 m=line, a=q, x=ratio, b=base, c=bound, s=s)


def _figures(report: Report, out: Path, results: dict[str, dict[str, Any]], shown: dict[str, dict[str, Tensor]],
             trajs: dict[str, dict[str, Tensor]], levels: dict[str, int | None], size: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ref = solve_label(size["solve"])
    panels = {}
    for d, r in results.items():
        curves = {label: ([k for k in NFE if q[str(k)] is not None], [q[str(k)] for k in NFE if q[str(k)] is not None])
                  for label, q in r["quality"].items()}
        if r["reference"] is not None:
            curves[f"teacher {ref} (NFE {r['reference']['nfe']:.0f})"] = ([NFE[0], NFE[-1]],
                                                                           [r["reference"]["quality"]] * 2)
        curves["data floor"] = ([NFE[0], NFE[-1]], [r["floor"][0]] * 2)
        panels[f"{d} ({r['measure']})"] = curves
    lines_png(out / "quality_vs_nfe.png", panels, xlabel="calls (NFE)", ylabel="sample quality (lower is better)",
              logx=True, logy=True)
    report.figure("quality_vs_nfe.png", f"Sample quality against calls per method and solver; flat lines: the "
                                        f"teacher's {ref} and the data floor")
    for d, samples in shown.items():
        if d in levels:
            grids_png(out / f"samples_{d}.png", {k: x[:64] for k, x in samples.items()}, levels[d],
                      title=f"{d}: one call per method")
        else:
            clouds_png(out / f"samples_{d}.png", samples, title=f"{d}: one call per method")
        report.figure(f"samples_{d}.png", f"{d}: samples of one call per method, beside the teacher's {ref}")
    for d, by in trajs.items():
        trajectories_png(out / f"trajectories_{d}.png", {k: t[..., :2] for k, t in by.items()},
                         title=f"{d}: RK4 x {size['traj_steps']} trajectories")
        report.figure(f"trajectories_{d}.png", f"{d}: the teacher's and the reflowed model's trajectories")
