"""Experiment ``conditional``: conditional generation with Flow Matching, at small scale; the report's
introduction (``intro``) is written from its settings.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastfm.data import get_dataset
from fastfm.experiments.common import (MEDIUM_UNET, SMALL_UNET, TINY_UNET, VERDICTS, Context, Trained, grids_png,
                                       lines_png, recorded, solve_label, train)
from fastfm.experiments.judges import ImageJudge
from fastfm.experiments.report import Report
from fastfm.experiments.verdicts import bootstrap_std, lower, noise

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"guided": {"steps": 6, "batch_size": 32, "model_args": TINY_UNET},
             "superres": {"digits": {"steps": 6, "batch_size": 32, "model_args": TINY_UNET}},
             "guidance": [0.0, 1.0, 2.0, 4.0], "per_class": 3, "sr_n": 8, "sr_k": 2, "classifier_steps": 20,
             "solve": {"solver": "rk4", "steps": 2}},
    "cpu": {"guided": {"steps": 2000, "batch_size": 128, "model_args": SMALL_UNET},
            "superres": {"digits": {"steps": 1500, "batch_size": 128, "model_args": SMALL_UNET}},
            "guidance": [0.0, 1.0, 2.0, 4.0], "per_class": 50, "sr_n": 300, "sr_k": 4, "classifier_steps": 600,
            "solve": {"solver": "rk4", "steps": 10}},
    "gpu": {"guided": {"steps": 5000, "batch_size": 256, "model_args": MEDIUM_UNET},
            "superres": {"digits": {"steps": 4000, "batch_size": 256, "model_args": MEDIUM_UNET},
                         "mnist5k": {"steps": 4000, "batch_size": 128, "model_args": MEDIUM_UNET}},
            "guidance": [0.0, 1.0, 2.0, 4.0], "per_class": 200, "sr_n": 1000, "sr_k": 8, "classifier_steps": 2000,
            "solve": {"solver": "rk4", "steps": 25}},
}

DESCRIPTION = "class-conditional digits with guidance w in {0, 1, 2, 4}; super-resolution vs bicubic (PSNR)"
FACTOR = 2
"""Super-resolution factor: 4x4 -> 8x8 digits, 14x14 -> 28x28 MNIST-5k."""


def trainings(scale: str) -> dict[str, dict[str, Any]]:
    """Every run this experiment trains at ``scale``: key -> TrainConfig options."""
    size = SIZES[scale]
    runs = {"digits-class-cond": {"data": "digits", "class_cond": True, **size["guided"]}}
    runs.update({f"{d}-superres": {"data": d, "superres": FACTOR, **o} for d, o in size["superres"].items()})
    return runs


def intro(settings: dict[str, Any]) -> str:
    """What the experiment does, from its recorded settings."""
    ws = ", ".join(f"{w:g}" for w in settings["guidance"])
    return (f"Class-conditional digits with classifier-free guidance v = v_u + w (v_c - v_u), w in {{{ws}}} (w = 0 "
            f"the unconditional field, w = 1 the conditional one): the accuracy of a small classifier that fastfm "
            f"trains on the training split, on samples of each requested class, their diversity (mean pairwise "
            f"distance of the classifier's features within a class, relative to the test images') and their "
            f"classifier Fréchet distance to the test set. Super-resolution on "
            f"{', '.join(settings['superres'])}: the UNet conditioned on the {settings['factor']}x average-pooled "
            f"image, PSNR of a sample and of the mean of {settings['sr_k']} samples against the test image, beside "
            f"bicubic upsampling of the same low-resolution input. " + VERDICTS.format(**settings))


def run(ctx: Context) -> Report:
    size = SIZES[ctx.scale]
    settings = recorded({**size, "factor": FACTOR})
    report = Report("conditional", "Conditional generation: guidance and super-resolution", ctx.scale,
                    intro=intro(settings), settings=settings)
    ctx.plan("conditional", 3 + 2 * len(size["superres"]))
    _guidance(ctx, report, size)
    _superres(ctx, report, size)
    ctx.close()
    return report


def _guidance(ctx: Context, report: Report, size: dict[str, Any]) -> None:
    ctx.stage("classifier digits")
    judge = ImageJudge(get_dataset("digits", seed=ctx.seed), ctx.seed, size["classifier_steps"], ctx.progress)
    report.data["classifier_test_accuracy"] = judge.test_accuracy
    ctx.done()
    run_ = train(ctx, "digits-class-cond", trainings(ctx.scale)["digits-class-cond"])
    ctx.stage("evaluate guidance")
    data, classes = run_.data, run_.data.num_classes
    labels = torch.arange(classes).repeat_interleave(size["per_class"])
    real = _diversity(judge.features(data.test), data.test_labels)
    rows, grids, acc, div, div_spread = [], {}, {}, {}, {}

    def diversity(r: Tensor) -> float:
        """Diversity relative to the test images' of rows (classifier features, then the label)."""
        return _diversity(r[:, :-1], r[:, -1].long()) / real

    for w in size["guidance"]:
        x = run_.sampler(guidance=w, **size["solve"]).sample(len(labels), seed=ctx.seed, cond={"y": labels},
                                                             progress=ctx.progress).x
        acc[w] = judge.accuracy(x, labels)
        features = torch.cat([judge.features(x), labels[:, None].to(x.dtype)], 1)
        div[w], div_spread[w] = diversity(features), bootstrap_std(diversity, features, ctx.seed)
        rows.append([w, acc[w], div[w], judge(x)])
        grids[f"w = {w:g}"] = x.view(classes, size["per_class"], *x.shape[1:])[:, :8].transpose(0, 1).flatten(0, 1)
    report.table("guidance", "Class-conditional digits: guidance scale",
                 ["w", "classifier accuracy", "diversity (data = 1)", "classifier Fréchet distance"], rows,
                 note=f"{size['per_class']} samples per class by {solve_label(size['solve'])}; the classifier "
                      f"(trained on the training split) reaches {judge.test_accuracy:.4g} on the test images. "
                      f"Diversity: mean pairwise feature distance within a class over the test images'.")
    ws, n = size["guidance"], len(labels)
    acc_se = {w: math.sqrt(acc[w] * (1 - acc[w]) / n) for w in ws}  # binomial standard error
    report.judge("conditioning on the class works: accuracy rises from the unconditional field (w = 0) to the "
                 "conditional one (w = 1)", lower(-acc[1.0], -acc[0.0], noise(acc_se[0.0], acc_se[1.0])),
                 "accuracy {a} at w = 0, {b} at w = 1, standard error {s}", a=acc[0.0], b=acc[1.0],
                 s=noise(acc_se[0.0], acc_se[1.0]))
    best = max((w for w in ws if w > 1), key=lambda w: acc[w])
    report.judge("guidance (w > 1) raises the accuracy further", lower(-acc[best], -acc[1.0],
                                                                      noise(acc_se[1.0], acc_se[best])),
                 "accuracy {b} at w = {w} vs {a} at w = 1, standard error {s}", a=acc[1.0], b=acc[best], w=best,
                 s=noise(acc_se[1.0], acc_se[best]))
    spread = noise(div_spread[1.0], div_spread[ws[-1]])
    report.judge("guidance trades diversity for fidelity: diversity falls from w = 1 to the largest w",
                 lower(div[ws[-1]], div[1.0], spread), "diversity {a} at w = 1, {b} at w = {w}, bootstrap noise {s}",
                 a=div[1.0], b=div[ws[-1]], w=ws[-1], s=spread)
    report.data["guidance"] = {"accuracy": acc, "diversity": div, "diversity_spread": div_spread}
    ctx.out.mkdir(parents=True, exist_ok=True)
    grids_png(ctx.out / "guidance_samples.png", grids, data.levels, nrow=classes,
              title="8 samples per class (columns: digits 0-9)")
    report.figure("guidance_samples.png", "Samples per guidance scale: each column one requested digit")
    lines_png(ctx.out / "guidance.png", {"accuracy": {"samples": (ws, [acc[w] for w in ws])},
                                         "diversity": {"samples": (ws, [div[w] for w in ws])}},
              xlabel="guidance w", ylabel="")
    report.figure("guidance.png", "Classifier accuracy and diversity against the guidance scale")
    ctx.done()


def _diversity(features: Tensor, labels: Tensor) -> float:
    """Mean over classes of the mean pairwise Euclidean distance between features of one class."""
    per_class = []
    for c in labels.unique():
        f = features[labels == c].double()
        if len(f) > 1:
            d = torch.cdist(f, f)
            per_class.append(float(d.sum() / (len(f) * (len(f) - 1))))
    return sum(per_class) / len(per_class)


def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1] on the [0, 1] scale: 10 log10(1 / MSE)."""
    mse = ((x.clamp(-1, 1) - ref) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def _superres(ctx: Context, report: Report, size: dict[str, Any]) -> None:
    rows, grids = [], {}
    runs = trainings(ctx.scale)
    for name in size["superres"]:
        run_ = train(ctx, f"{name}-superres", runs[f"{name}-superres"])
        ctx.stage(f"evaluate {name} super-resolution")
        r, grid = _superres_eval(ctx, run_, size)
        rows.append([name, f"{r['low']} -> {r['high']}", r["one"], r["mean_k"], r["one_stderr"], r["bicubic"],
                     r["nearest"], r["consistency"]])
        report.judge(f"{name}: a super-resolution sample beats bicubic upsampling in PSNR",
                     lower(-r["one"], -r["bicubic"], r["gain_stderr"]),
                     "{a} dB vs {b} dB, paired difference standard error {s}", a=r["one"], b=r["bicubic"],
                     s=r["gain_stderr"])
        report.data.setdefault("superres", {})[name] = r
        grids[name] = grid
        ctx.done()
    k = size["sr_k"]
    report.table("superres", f"Super-resolution x{FACTOR}: PSNR against the test image (dB, higher is better)",
                 ["data", "resolution", "one sample", f"mean of {k} samples", "sample stderr", "bicubic", "nearest",
                  "low-res consistency"], rows,
                 note=f"{size['sr_n']} test images, samples by {solve_label(size['solve'])}; the low-resolution "
                      f"input is the {FACTOR}x{FACTOR} average pool, as in training. A sample is a draw from the "
                      f"posterior, the mean of k samples approaches the posterior mean (the PSNR-optimal guess). "
                      f"Low-res consistency: PSNR of the sample's own average pool against the input.")
    for name, g in grids.items():
        grids_png(ctx.out / f"superres_{name}.png", g, None, nrow=4,
                  title=f"{name}: low-res input (nearest), bicubic, sample, truth")
        report.figure(f"superres_{name}.png", f"{name}: low-resolution input, bicubic, a sample, the test image")


def _superres_eval(ctx: Context, run_: Trained, size: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    data, k = run_.data, size["sr_k"]
    truth = data.test[: size["sr_n"]]
    low = F.avg_pool2d(truth, FACTOR)
    cond = {"low_res": low.repeat(k, 1, 1, 1)}
    x = run_.sampler(**size["solve"]).sample(len(truth) * k, seed=ctx.seed, cond=cond, progress=ctx.progress).x
    x = x.clamp(-1, 1).view(k, *truth.shape)
    one = psnr(x[0], truth)
    bicubic = F.interpolate(low, scale_factor=FACTOR, mode="bicubic", align_corners=False)
    nearest = F.interpolate(low, scale_factor=FACTOR, mode="nearest")
    r = {"low": "x".join(map(str, low.shape[2:])), "high": "x".join(map(str, truth.shape[2:])),
         "one": float(one.mean()), "mean_k": float(psnr(x.mean(0), truth).mean()),
         "one_stderr": float(one.std() / math.sqrt(len(one))),
         "bicubic": float(psnr(bicubic, truth).mean()), "nearest": float(psnr(nearest, truth).mean()),
         "gain_stderr": float((one - psnr(bicubic, truth)).std() / math.sqrt(len(one))),
         "consistency": float(psnr(F.avg_pool2d(x[0], FACTOR), low).mean())}
    show = slice(0, 16)
    grid = {"low-res": nearest[show], "bicubic": bicubic[show].clamp(-1, 1), "sample": x[0, show], "truth": truth[show]}
    return r, grid
