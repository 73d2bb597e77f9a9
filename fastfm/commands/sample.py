"""``python -m fastfm.sample``: draw samples from a trained run or an exported engine; .npy plus a PNG grid
or scatter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fastfm.commands.common import add_sampling_options, inference_parser, open_sampler, read_low_res
from fastfm.evaluation.plotting import nonfinite_rows, save_samples_png
from fastfm.run.load import dataset_of
from fastfm.run.meta import RunMeta
from fastfm.solve import SolvePlan
from fastfm.solve.settings import SAMPLE_COUNTS


def png_title(meta: RunMeta, plan: SolvePlan, nfe: int) -> str:
    """What drew the samples: data, path, solver x steps, NFE (and guidance, the SDE's diffusion where used)."""
    solved = plan.describe()
    extra = (f", guidance {plan.guidance:g}" if plan.guidance != 1 else "") + \
        (f", eps {plan.diffusion}" if plan.diffusion else "")
    return f"{meta.data.name}, {meta.path}, {solved['solver']} x {solved['steps']}, NFE {nfe}{extra}"


def main(argv: list[str] | None = None) -> None:
    p = inference_parser("sample", "Sample from a trained flow matching model; writes samples.npy, samples.png "
                         "(and log_prob.npy) to --out.")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=None,
                   help=f"number of samples (default {SAMPLE_COUNTS['vector']} vectors, "
                        f"{SAMPLE_COUNTS['image']} images)")
    g.add_argument("--low-res", default=None, help="super-resolution inputs as .npy (default: the test set's)")
    add_sampling_options(g, "sample with the SDE dX = [v + eps/2 score] dt + sqrt(eps) dW (Euler-Maruyama over "
                            "--steps; Gaussian-base paths): same marginals as the ODE")
    g.add_argument("--log-likelihood", action="store_true", help="also integrate the samples' log-likelihood")
    g.add_argument("--out", default=None,
                   help="output directory (default: CHECKPOINT_DIR/samples, or ENGINE_DIR/samples with --engine)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n is not None and args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        sampler = open_sampler(args, "sample")
        meta = sampler.meta
        kind = meta.data.kind
        n = args.n or SAMPLE_COUNTS[kind]
        cond = {}
        if args.low_res or meta.superres:
            low = read_low_res(args.low_res, meta)[:n] if args.low_res else None
            cond = {"low_res": low} if low is not None else meta.conditioning(dataset_of(meta).test[:n])
            n = min(n, cond["low_res"].shape[0])
        plan = sampler.plan("sample", log_likelihood=args.log_likelihood)
        res = sampler.sample(n, seed=args.seed, cond=cond, log_likelihood=args.log_likelihood)
        bad = nonfinite_rows(res.x)
        if bad:
            raise ValueError(f"{bad} of {n} samples hold NaN/Inf values: the model's weights or the sampling settings "
                             "(solver, steps, guidance) produce non-finite values; nothing written")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    base = Path(args.checkpoint or args.engine)
    out = Path(args.out) if args.out else (base if base.is_dir() else base.parent) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", res.x.numpy())
    save_samples_png(res.x, out / "samples.png", kind, meta.data.levels, title=png_title(meta, plan, res.nfe))
    summary = {"n": n, "nfe": res.nfe, **sampler.describe(), "guidance": plan.guidance,
               "samples": str(out / "samples.npy"), "png": str(out / "samples.png")}
    if plan.diffusion:
        summary["diffusion"] = plan.diffusion
    if res.log_prob is not None:
        np.save(out / "log_prob.npy", res.log_prob.numpy())
        summary["mean_log_prob_nats"] = float(res.log_prob.mean())
    print(json.dumps(summary))
