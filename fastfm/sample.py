"""``python -m fastfm.sample``: draw samples from a trained run; .npy plus a PNG grid or scatter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fastfm.cli import inference_parser, low_res_of, run_dataset, setup, setup_engine
from fastfm.evaluation import engine_generate, generate, save_samples_png, steps_run
from fastfm.sde import parse_diffusion


def _load_low_res(path: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(path)).float()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --low-res {path}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    p = inference_parser("sample", "Sample from a trained flow matching model; writes samples.npy, samples.png "
                         "(and log_prob.npy) to --out.")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=None, help="number of samples (default 2000 vectors, 64 images)")
    g.add_argument("--class-label", type=int, default=None,
                   help="class to sample (conditional models; default: cycle through all classes)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w (default 1: none)")
    g.add_argument("--low-res", default=None, help="super-resolution inputs as .npy (default: the test set's)")
    g.add_argument("--sde", action="store_true",
                   help="sample with the SDE dX = [v + eps/2 score] dt + sqrt(eps) dW (Euler-Maruyama over --steps; "
                        "Gaussian-base paths): same marginals as the ODE")
    g.add_argument("--diffusion", default="1",
                   help="eps(t) of --sde: a constant C, or sin2:C for C sin^2(pi t) (vanishing at both ends)")
    g.add_argument("--log-likelihood", action="store_true", help="also integrate the samples' log-likelihood")
    g.add_argument("--out", default=None,
                   help="output directory (default: CHECKPOINT_DIR/samples, or ENGINE_DIR/samples with --engine)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n is not None and args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        engine = setup_engine(args, "sample") if args.engine else None
        run = None if engine else setup(args)
        meta = engine.meta if engine else run.meta
        kind, classes = meta["data"]["kind"], meta["model"].get("num_classes")
        n = args.n or (2000 if kind == "vector" else 64)
        cond = {}
        if args.class_label is not None and (classes is None or not 0 <= args.class_label < classes):
            raise ValueError(f"--class-label {args.class_label} invalid: the model has "
                             f"{'no classes' if classes is None else f'classes 0..{classes - 1}'}")
        baked = engine.spec.class_label if engine else None
        if baked is not None and args.class_label not in (None, baked):
            raise ValueError(f"--class-label {args.class_label} conflicts with the engine's baked class {baked}")
        if classes is not None and baked is None:
            cond["y"] = torch.full((n,), args.class_label) if args.class_label is not None else torch.arange(n) % classes
        if engine and args.guidance not in (None, engine.spec.guidance):
            raise ValueError(f"--guidance {args.guidance} conflicts with the engine's baked guidance {engine.spec.guidance}")
        guidance = engine.spec.guidance if engine else (1.0 if args.guidance is None else args.guidance)
        if guidance != 1.0 and classes is None:
            raise ValueError("--guidance needs a class-conditional model")
        if engine and args.log_likelihood and not engine.spec.log_likelihood:
            raise ValueError(f"--engine {args.engine} computes no log-likelihood; export it with --log-likelihood")
        if args.low_res and not meta.get("superres", 0):
            raise ValueError("--low-res given, but the model was not trained for super-resolution")
        if meta.get("superres", 0):
            low = _load_low_res(args.low_res) if args.low_res else None
            cond.update({"low_res": low[:n]} if low is not None else low_res_of(meta, run_dataset(meta).test[:n]))
            n = min(n, cond["low_res"].shape[0])
            cond = {k: v[:n] for k, v in cond.items()}
        diffusion = parse_diffusion(args.diffusion) if args.sde else None
        if engine:  # an SDE engine has its diffusion built in
            if diffusion is not None and str(diffusion) != engine.spec.diffusion:
                built = "runs the ODE" if engine.spec.diffusion is None else f"has diffusion {engine.spec.diffusion}"
                raise ValueError(f"--sde --diffusion {diffusion}: the engine {built}; export one with "
                                 f"python -m fastfm.export --task sample --sde --diffusion {diffusion}")
            diffusion = None if engine.spec.diffusion is None else parse_diffusion(engine.spec.diffusion)
            res = engine_generate(engine, n, seed=args.seed, cond=cond)
        else:
            res = generate(run.model, run.path, n, run.shape, target=meta["target"], method=args.solver,
                           grid=args.grid, steps=args.steps, seed=args.seed, guidance=guidance, cond=cond,
                           log_likelihood=args.log_likelihood, divergence=args.divergence, n_probes=args.probes,
                           batch_size=args.batch_size, diffusion=diffusion)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    base = Path(args.checkpoint or args.engine)
    out = Path(args.out) if args.out else (base if base.is_dir() else base.parent) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", res.x.numpy())
    save_samples_png(res.x, out / "samples.png", kind, meta["data"]["levels"])
    summary = {"n": n, "nfe": res.nfe, "solver": "euler-maruyama" if diffusion else args.solver,
               "steps": (engine.spec.steps if engine else args.steps) if diffusion
               else steps_run(args.solver, args.steps, args.grid),
               "guidance": guidance,
               "samples": str(out / "samples.npy"), "png": str(out / "samples.png")}
    if diffusion:
        summary["diffusion"] = str(diffusion)
    if engine:
        summary.update(engine=args.engine, backend=engine.spec.backend, dtype=engine.spec.dtype)
    if res.log_prob is not None:
        np.save(out / "log_prob.npy", res.log_prob.numpy())
        summary["mean_log_prob_nats"] = float(res.log_prob.mean())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
