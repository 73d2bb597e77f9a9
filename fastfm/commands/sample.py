"""``python -m fastfm.sample``: draw samples from a trained run or an exported engine; .npy plus a PNG grid
or scatter."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fastfm.commands.common import (add_sde_options, inference_parser, low_res_of, open_sampler, read_low_res,
                                    run_dataset)
from fastfm.inference import Sampler
from fastfm.plotting import nonfinite_rows, save_samples_png


def png_title(meta: dict[str, Any], sampler: Sampler, nfe: int) -> str:
    """What drew the samples: data, path, solver x steps, NFE (and guidance, the SDE's diffusion where used)."""
    s, solved = sampler.settings, sampler.describe()
    extra = (f", guidance {s.guidance:g}" if s.guidance != 1 else "") + (f", eps {s.diffusion}" if s.diffusion else "")
    return f"{meta['data']['name']}, {meta['path']['name']}, {solved['solver']} x {solved['steps']}, NFE {nfe}{extra}"


def main(argv: list[str] | None = None) -> None:
    p = inference_parser("sample", "Sample from a trained flow matching model; writes samples.npy, samples.png "
                         "(and log_prob.npy) to --out.")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=None, help="number of samples (default 2000 vectors, 64 images)")
    g.add_argument("--class-label", type=int, default=None,
                   help="class to sample (conditional models; default: cycle through all classes)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w (default 1: none)")
    g.add_argument("--low-res", default=None, help="super-resolution inputs as .npy (default: the test set's)")
    add_sde_options(g, "sample with the SDE dX = [v + eps/2 score] dt + sqrt(eps) dW (Euler-Maruyama over --steps; "
                       "Gaussian-base paths): same marginals as the ODE")
    g.add_argument("--log-likelihood", action="store_true", help="also integrate the samples' log-likelihood")
    g.add_argument("--out", default=None,
                   help="output directory (default: CHECKPOINT_DIR/samples, or ENGINE_DIR/samples with --engine)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n is not None and args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        sampler = open_sampler(args, "sample")
        meta = sampler.meta
        kind = meta["data"]["kind"]
        n = args.n or (2000 if kind == "vector" else 64)
        cond = {}
        if args.low_res or meta.get("superres", 0):
            low = read_low_res(args.low_res, meta) if args.low_res else None
            cond = {"low_res": low[:n]} if low is not None else low_res_of(meta, run_dataset(meta).test[:n])
            n = min(n, cond["low_res"].shape[0])
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
    settings = sampler.settings
    save_samples_png(res.x, out / "samples.png", kind, meta["data"]["levels"], title=png_title(meta, sampler, res.nfe))
    summary = {"n": n, "nfe": res.nfe, **sampler.describe(), "guidance": settings.guidance,
               "samples": str(out / "samples.npy"), "png": str(out / "samples.png")}
    if settings.diffusion:
        summary["diffusion"] = settings.diffusion
    if res.log_prob is not None:
        np.save(out / "log_prob.npy", res.log_prob.numpy())
        summary["mean_log_prob_nats"] = float(res.log_prob.mean())
    print(json.dumps(summary))
