"""Experiment ``backbones``: the UNet against the SiT transformer (Peebles & Xie, 2023; Ma et al., 2024), with and
without LightningDiT's options (Yao et al., 2025), at about the same parameter count and for the same training
wall time; the report's introduction (``intro``) is written from its settings.

Equal time: each backbone's steps are the training budget times its steps per second, measured on this device by
``steps_for`` before the backbones train (``common.train`` runs a fixed number of steps), so the runs' measured
seconds match the budget to within the machine's noise; the report gives both. The models train unconditionally:
the test bits/dim is then the data's likelihood (comparable with the paths experiment's) and no guidance scale
enters the comparison.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor

from fastfm.data import get_dataset
from fastfm.experiments.common import (MEDIUM_UNET, SMALL_UNET, TINY_UNET, VERDICTS, Context, Trained, attempt,
                                       batched_sample, grids_png, lines_png, recorded, solve_label, train)
from fastfm.experiments.judges import FLOOR_DRAWS, ImageJudge
from fastfm.experiments.paths import nll_claim, held_out_nll
from fastfm.experiments.report import Report
from fastfm.experiments.verdicts import lower, noise
from fastfm.training.config import TrainConfig
from fastfm.training.trainer import Trainer

LIGHTNING = {"norm": "rms", "mlp": "swiglu", "rope": True, "qk_norm": True}
"""LightningDiT's options of the SiT: RMSNorm, SwiGLU, 2D rotary positions, query-key normalisation."""
BACKBONES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "unet": ("UNet", "unet", {}),
    "sit": ("SiT", "sit", {}),
    "lightning": ("SiT + LightningDiT", "sit", LIGHTNING),
}
"""key -> (label, ``--model``, options added to the scale's SiT arguments). The plain SiT keeps its defaults
(LayerNorm, GELU MLP, fixed sin-cos positions only)."""
SITS = ("sit", "lightning")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"data": {"digits": {"batch_size": 16, "unet": TINY_UNET,
                                 "sit": {"patch": 2, "hidden_size": 16, "depth": 1, "num_heads": 2}}},
             "budget_s": 0.5, "probe_steps": 2, "curve_points": 2, "curve_n": 16, "nll_n_image": 4,
             "samples_image": 24, "classifier_steps": 20, "solve": {"solver": "rk4", "steps": 4},
             "sample_solve": {"solver": "rk4", "steps": 4}, "curve_solve": {"solver": "rk4", "steps": 2}},
    "cpu": {"data": {"digits": {"batch_size": 64, "unet": SMALL_UNET,
                                "sit": {"patch": 2, "hidden_size": 48, "depth": 4, "num_heads": 4}}},
            "budget_s": 40.0, "probe_steps": 20, "curve_points": 4, "curve_n": 200, "nll_n_image": 40,
            "samples_image": 500, "classifier_steps": 600, "solve": {"solver": "dopri5"},
            "sample_solve": {"solver": "rk4", "steps": 10}, "curve_solve": {"solver": "rk4", "steps": 5}},
    "gpu": {"data": {"digits": {"batch_size": 256, "unet": MEDIUM_UNET,
                                "sit": {"patch": 2, "hidden_size": 96, "depth": 6, "num_heads": 4}},
                     "mnist5k": {"batch_size": 128, "unet": MEDIUM_UNET,
                                 "sit": {"patch": 2, "hidden_size": 96, "depth": 6, "num_heads": 4}}},
            "budget_s": 30.0, "probe_steps": 50, "curve_points": 8, "curve_n": 1000, "nll_n_image": 500,
            "samples_image": 2000, "classifier_steps": 2000, "solve": {"solver": "dopri5"},
            "sample_solve": {"solver": "dopri5"}, "curve_solve": {"solver": "rk4", "steps": 10}},
}
"""Per scale and data set: the batch every backbone shares, the UNet's and the SiT's arguments (about the same
parameter count: within PARAMS_TOLERANCE); then the training budget (seconds per backbone), the steps timed to
size it, and the evaluation sizes and solves (``solve`` the test NLL's, ``sample_solve`` the samples': RK4 x 10 on
2 CPU cores, where 500 samples by dopri5, about 300 calls each, took 30-76 s per backbone while this was sized,
as long as the training). The gpu scale is sized for one GPU, not measured (no GPU was lent)."""
PARAMS_TOLERANCE = 0.2
"""A SiT's parameter count is within this fraction of the UNet's at every scale (tests/test_experiment_backbones)."""

DESCRIPTION = "UNet vs SiT (and LightningDiT's options) at similar parameters and equal training time"


def trainings(scale: str) -> dict[str, dict[str, Any]]:
    """Every run this experiment trains at ``scale``: key -> TrainConfig options but the steps (``steps_for``)."""
    runs = {}
    for d, options in SIZES[scale]["data"].items():
        for key, (_, model, extra) in BACKBONES.items():
            args = options["unet"] if model == "unet" else {**options["sit"], **extra}
            runs[f"{d}-{key}"] = {"data": d, "model": model, "model_args": args, "batch_size": options["batch_size"]}
    return runs


WARMUP_STEPS = 3
"""Untimed steps of each backbone before its timing: the first steps run slow (allocations, kernel choices)."""


def steps_for(ctx: Context, runs: dict[str, dict[str, Any]], budget_s: float,
              probe: int) -> dict[str, tuple[int, float]]:
    """Each run's steps that fill ``budget_s`` seconds of training on the context's device, and the steps per second
    they come from: 1 / the median time of ``probe`` steps of a throwaway trainer (nothing written) after
    WARMUP_STEPS, the runs' steps taken in turn so that each sees the same load of a shared machine (the median
    leaves out the steps another job stalled)."""
    ctx.stage(f"time {', '.join(runs)}")
    trainers = {key: Trainer(TrainConfig(**{"seed": ctx.seed, "device": ctx.device, **options,
                                           "steps": WARMUP_STEPS + probe}).validate())
                for key, options in runs.items()}
    cuda = any(tr.device.type == "cuda" for tr in trainers.values())
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {key: [] for key in runs}
    for step in range(1, WARMUP_STEPS + probe + 1):
        for key, tr in trainers.items():
            sync()
            started = time.perf_counter()
            tr.train_step(step)
            sync()
            if step > WARMUP_STEPS:
                times[key].append(time.perf_counter() - started)
    rates = {key: 1.0 / statistics.median(t) for key, t in times.items()}
    return {key: (max(1, round(budget_s * rate)), rate) for key, rate in rates.items()}


def intro(settings: dict[str, Any]) -> str:
    """What the experiment trains and measures, from its recorded settings."""
    ref, sample, curve = (solve_label(settings[k]) for k in ("solve", "sample_solve", "curve_solve"))
    data = settings["data"]
    shapes = "; ".join(f"{d}: UNet {_args(o['unet'])}, SiT {_args(o['sit'])}, batch {o['batch_size']}"
                       for d, o in data.items())
    return (f"Each data set ({', '.join(data)}) trains three backbones of about the same parameter count (the SiT "
            f"count within a fraction {settings['params_tolerance']:g} of the UNet's) for the same training budget, "
            f"{settings['budget_s']:g} s each: the UNet; a SiT (DiT blocks with adaLN-Zero on patch tokens) with "
            f"its defaults (LayerNorm, GELU MLP, fixed sin-cos positions); the same SiT with LightningDiT's options "
            f"(RMSNorm, SwiGLU, 2D RoPE, QK-norm). Sizes: {shapes}. Equal time: a backbone's steps are the budget "
            f"times its steps per second: 1 / the median time of {settings['probe_steps']} steps, the backbones' "
            f"steps taken in turn (after {settings['warmup_steps']} untimed ones) so that each sees the same load; "
            f"the table gives the steps and the seconds each run took. Same batch, learning rate (fastfm's "
            f"default, not tuned per backbone), EMA and seed for the three, unconditional (the test bits/dim is the "
            f"data's likelihood and no guidance scale enters the comparison). Measured: test bits/dim ({ref}, "
            f"Hutchinson divergence) on the first {settings['nll_n_image']} test images, the same for each backbone "
            f"(paired); the classifier Fréchet distance of {settings['samples_image']} samples ({sample}) with its "
            f"bootstrap spread, and along training against the training seconds ({settings['curve_n']} samples, "
            f"{curve}); training throughput (images per second); parameter counts. " + VERDICTS.format(**settings))


def _args(args: dict[str, Any]) -> str:
    """Model arguments as ``--model-args`` reads them (the UNet's empty attention list left out)."""
    return " ".join(f"{k}={v}".replace(" ", "") for k, v in args.items() if k != "attention_resolutions")


def run(ctx: Context) -> Report:
    size = SIZES[ctx.scale]
    runs = trainings(ctx.scale)
    ctx.plan("backbones", len(size["data"]) * (1 + 2 * len(BACKBONES)))
    settings = recorded({**size, "backbones": {k: [label, model, extra] for k, (label, model, extra) in
                                               BACKBONES.items()}, "params_tolerance": PARAMS_TOLERANCE,
                         "warmup_steps": WARMUP_STEPS})
    report = Report("backbones", "Backbones: UNet against SiT at equal parameters and training time", ctx.scale,
                    intro=intro(settings), settings=settings)
    results: dict[str, dict[str, Any]] = {}
    shown: dict[str, dict[str, Tensor]] = {}
    levels: dict[str, int | None] = {}
    for d in size["data"]:
        ctx.stage(f"classifier {d}")
        data = get_dataset(d, seed=ctx.seed)
        judge = ImageJudge(data, ctx.seed, size["classifier_steps"], ctx.progress)
        report.data.setdefault("classifier_test_accuracy", {})[d] = judge.test_accuracy
        levels[d] = data.levels
        ctx.done()
        results[d], shown[d] = {"floor": judge.floor(size["samples_image"]), "runs": {}}, {}
        ours = {key: options for key, options in runs.items() if options["data"] == d}
        timed = steps_for(ctx, ours, size["budget_s"], size["probe_steps"])
        for key, (label, _, _) in BACKBONES.items():
            steps, rate = timed[f"{d}-{key}"]
            run_ = train(ctx, f"{d}-{key}", {**runs[f"{d}-{key}"], "steps": steps}, evaluate=_curve(judge, size, ctx),
                         every=-(-steps // size["curve_points"]))
            ctx.stage(f"evaluate {d}-{key}")
            r, x = _evaluate(ctx, run_, judge, size, report.notes)
            results[d]["runs"][key] = {**r, "probe_steps_per_s": rate, "probe_images_per_s": rate * r["batch_size"]}
            if x is not None:
                shown[d][label] = x
            ctx.done()
    _tables(report, results, size)
    _claims(report, results)
    for by in results.values():  # the per-point NLLs behind the paired claims stay out of the JSON
        for r in by["runs"].values():
            r.pop("points")
    report.data["results"] = results
    _figures(report, ctx, results, shown, levels, size)
    if "mnist5k" not in size["data"]:
        report.notes.append("MNIST-5k runs only at `--scale gpu`: at this scale 28x28 backbones do not train within "
                            "the CPU budget.")
    report.notes.append("Each backbone's steps come from its throughput timed while the experiment ran: a re-run "
                        "trains other step counts, and where other jobs load the machine during one backbone's "
                        "timing or training its seconds differ from the budget (the table's train s says by how "
                        "much).")
    ctx.close()
    return report


def _curve(judge: ImageJudge, size: dict[str, Any], ctx: Context) -> Callable[[Trained, int], dict[str, Any]]:
    """The evaluation along training: the Fréchet distance of ``curve_n`` samples by ``curve_solve`` of the EMA
    model (the same prior draws each time), with the training seconds so far."""
    def evaluate(run_: Trained, step: int) -> dict[str, Any]:
        x = run_.sampler(**size["curve_solve"]).sample(size["curve_n"], seed=ctx.seed, progress=False).x
        return {"train_s": run_.wall_s, "frechet": judge(x)}
    return evaluate


def _evaluate(ctx: Context, run_: Trained, judge: ImageJudge, size: dict[str, Any],
              notes: list[str]) -> tuple[dict[str, Any], Tensor | None]:
    """A trained backbone's size, throughput, test NLL (with its per-point values for the paired claims) and the
    quality of its samples by ``sample_solve``; with the samples for the figure."""
    cfg = run_.trainer.cfg
    nll, points = held_out_nll(run_, size, ctx, notes, size["nll_n_image"], f"{run_.key} test NLL", ctx.progress)
    samples = attempt(notes, f"{run_.key} sampling", lambda: batched_sample(run_, size["sample_solve"],
                                                                              size["samples_image"], ctx.seed,
                                                                              ctx.progress))
    x, nfes = (None, None) if samples is None else samples
    out = {"params": sum(p.numel() for p in run_.trainer.model.parameters()), "model_args": cfg.model_args,
           "batch_size": cfg.batch_size, "steps": cfg.steps, "train_s": run_.wall_s,
           "images_per_s": cfg.steps * cfg.batch_size / run_.wall_s,
           "nll": None if nll is None else nll["bits_per_dim"],
           "nll_stderr": None if nll is None else nll["bits_per_dim_stderr"],
           "nll_nfe": None if nll is None else nll["nfe"], "points": points,
           "quality": None if x is None else judge(x), "quality_spread": None if x is None else judge.spread(x),
           "sample_nfe": None if nfes is None else sum(nfes) / len(nfes), "sample_nfes": nfes,
           "curve": run_.curve}
    return out, None if x is None else x[:64]


def _tables(report: Report, results: dict[str, dict[str, Any]], size: dict[str, Any]) -> None:
    ref, sample = solve_label(size["solve"]), solve_label(size["sample_solve"])
    rows = []
    for d, by in results.items():
        base = by["runs"]["unet"]["params"]
        for key, r in by["runs"].items():
            rows.append([d, BACKBONES[key][0], r["params"], r["params"] / base, r["steps"], r["train_s"],
                         r["probe_images_per_s"], r["images_per_s"], r["nll"], r["nll_stderr"], r["nll_nfe"],
                         r["quality"], r["quality_spread"]])
    report.table("main", "Size, throughput, test bits/dim and sample quality at equal training time",
                 ["data", "backbone", "parameters", "x UNet's", "steps", "train s", "images/s timed", "images/s",
                  "test bits/dim", "stderr", "NLL NFE", "Fréchet distance", "bootstrap spread"], rows,
                 note=f"Budget {size['budget_s']:g} s of training per backbone; train s: the measured training wall "
                      f"time (evaluations along the way left out); images/s timed: the throughput the steps come "
                      f"from (the backbones timed in turn), images/s: the run's, steps x batch / train s. Test "
                      f"bits/dim by {ref} on {size['nll_n_image']} test images, with the solve's model calls (NLL NFE: "
                      f"how hard the field is to integrate); the Fréchet distance of {size['samples_image']} "
                      f"samples ({sample}) to the test images in the classifier's features, lower is better.")
    report.table("floor", "Sample quality of the data itself (the floor)", ["data", "images", "mean", "std"],
                 [[d, size["samples_image"], *by["floor"]] for d, by in results.items()],
                 note=f"The classifier Fréchet distance of {FLOOR_DRAWS} fresh draws of as many training images as "
                      f"the samples: a sampler cannot do better than the mean.")


def _claims(report: Report, results: dict[str, dict[str, Any]]) -> None:
    """Each SiT against the UNet, and LightningDiT's options against the plain SiT, per data set: paired test
    bits/dim and the Fréchet distance beyond the bootstrap noise (rules: ``fastfm.experiments.verdicts``)."""
    for d, by in results.items():
        r = by["runs"]
        pairs = [(key, "unet", f"the {BACKBONES[key][0]} beats the UNet in the same training time") for key in SITS]
        pairs.append(("lightning", "sit", "LightningDiT's options improve the SiT in the same training time"))
        for a, b, claim in pairs:
            la, lb = BACKBONES[a][0], BACKBONES[b][0]
            nll_claim(report, f"{d}: {claim}: lower test bits/dim", (la, r[a]), (lb, r[b]), "bits/dim")
            spread = noise(r[a]["quality_spread"] or 0.0, r[b]["quality_spread"] or 0.0)
            report.judge(f"{d}: {claim}: lower Fréchet distance", lower(r[a]["quality"], r[b]["quality"], spread),
                         f"{la} {{a}} vs {lb} {{b}}, bootstrap noise {{s}}", a=r[a]["quality"], b=r[b]["quality"],
                         s=spread)


def _figures(report: Report, ctx: Context, results: dict[str, dict[str, Any]], shown: dict[str, dict[str, Tensor]],
             levels: dict[str, int | None], size: dict[str, Any]) -> None:
    out = ctx.out
    out.mkdir(parents=True, exist_ok=True)
    panels = {d: {BACKBONES[key][0]: ([c["train_s"] for c in r["curve"]], [c["frechet"] for c in r["curve"]])
                  for key, r in by["runs"].items()} for d, by in results.items()}
    lines_png(out / "quality_vs_time.png", panels, xlabel="training seconds", ylabel="classifier Fréchet distance",
              logy=True)
    report.figure("quality_vs_time.png", f"Fréchet distance of {size['curve_n']} samples "
                                         f"({solve_label(size['curve_solve'])}) along training, against the "
                                         f"training seconds, per backbone")
    ref = solve_label(size["sample_solve"])
    for d, grids in shown.items():
        if not grids:  # every sampling solve failed: the notes say why
            continue
        grids_png(out / f"samples_{d}.png", grids, levels[d], title=f"{d}: {ref} samples")
        report.figure(f"samples_{d}.png", f"{d}: samples per backbone ({ref})")
