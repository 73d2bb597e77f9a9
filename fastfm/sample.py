"""``python -m fastfm.sample``: draw samples from a trained run; .npy plus a PNG grid or scatter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fastfm.cli import inference_parser, low_res_of, run_dataset, setup
from fastfm.evaluation import generate, save_samples_png


def _load_low_res(path: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(path)).float()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --low-res {path}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    p = inference_parser("Sample from a trained flow matching model.")
    p.add_argument("--n", type=int, default=None, help="number of samples (default 2000 vectors, 64 images)")
    p.add_argument("--class-label", type=int, default=None,
                   help="class to sample (conditional models; default: cycle through all classes)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w (1: none)")
    p.add_argument("--low-res", default=None, help="super-resolution inputs as .npy (default: the test set's)")
    p.add_argument("--log-likelihood", action="store_true", help="also integrate the samples' log-likelihood")
    p.add_argument("--out", default=None, help="output directory (default: CHECKPOINT_DIR/samples)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n is not None and args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        run = setup(args)
        kind, classes = run.meta["data"]["kind"], run.model.num_classes
        n = args.n or (2000 if kind == "vector" else 64)
        cond = {}
        if args.class_label is not None:
            if classes is None or not 0 <= args.class_label < classes:
                raise ValueError(f"--class-label {args.class_label} invalid: the model has "
                                 f"{'no classes' if classes is None else f'classes 0..{classes - 1}'}")
            cond["y"] = torch.full((n,), args.class_label)
        elif classes is not None:
            cond["y"] = torch.arange(n) % classes
        if args.guidance != 1.0 and "y" not in cond:
            raise ValueError("--guidance needs a class-conditional model")
        if args.low_res and not run.meta.get("superres", 0):
            raise ValueError("--low-res given, but the model was not trained for super-resolution")
        if run.meta.get("superres", 0):
            low = _load_low_res(args.low_res) if args.low_res else None
            cond.update({"low_res": low[:n]} if low is not None else low_res_of(run, run_dataset(run).test[:n]))
            n = min(n, cond["low_res"].shape[0])
        res = generate(run.model, run.path, n, run.shape, target=run.meta["target"], method=args.solver, grid=args.grid,
                       steps=args.steps, seed=args.seed, guidance=args.guidance, cond=cond,
                       log_likelihood=args.log_likelihood, divergence=args.divergence, n_probes=args.probes,
                       batch_size=args.batch_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", res.x.numpy())
    save_samples_png(res.x, out / "samples.png", kind, run.meta["data"]["levels"])
    summary = {"n": n, "nfe": res.nfe, "solver": args.solver, "steps": args.steps, "guidance": args.guidance,
               "samples": str(out / "samples.npy"), "png": str(out / "samples.png")}
    if res.log_prob is not None:
        np.save(out / "log_prob.npy", res.log_prob.numpy())
        summary["mean_log_prob_nats"] = float(res.log_prob.mean())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
