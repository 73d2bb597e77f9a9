"""``python -m fastfm.evaluate``: test NLL (nats, bits/dim for images) with NFE, and for vector data
a sample-quality distance (energy distance, sliced Wasserstein) to the held-out set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastfm.cli import inference_parser, low_res_of, run_dataset, setup
from fastfm.evaluation import generate, sample_quality, test_nll


def main(argv: list[str] | None = None) -> None:
    p = inference_parser("Evaluate a trained flow matching model on its held-out data.")
    p.add_argument("--n", type=int, default=2000, help="test points for the NLL")
    p.add_argument("--n-samples", type=int, default=2000, help="samples for the quality metrics (vector data)")
    p.add_argument("--out", default=None, help="write the results JSON here as well")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n < 1 or args.n_samples < 1:
            raise ValueError("--n and --n-samples must be >= 1")
        run = setup(args)
        data = run_dataset(run)
        test = data.test[: args.n]
        cond = low_res_of(run, test)
        if run.model.num_classes is not None:
            cond["y"] = data.test_labels[: args.n]
        result = {"checkpoint": args.checkpoint, "data": run.meta["data"]["name"], "path": run.meta["path"],
                  "test": test_nll(run.model, run.path, test, target=run.meta["target"], levels=data.levels,
                                   method=args.solver, grid=args.grid, steps=args.steps, divergence=args.divergence,
                                   n_probes=args.probes, batch_size=args.batch_size, seed=args.seed, cond=cond)}
        if data.kind == "vector":
            n = min(args.n_samples, len(data.test))
            cond_s = {"y": data.test_labels[:n]} if run.model.num_classes is not None else {}
            res = generate(run.model, run.path, n, run.shape, target=run.meta["target"], method=args.solver, grid=args.grid,
                           steps=args.steps, seed=args.seed, cond=cond_s, batch_size=args.batch_size)
            result["quality"] = {**sample_quality(res.x, data.test[:n], args.seed), "n": n, "nfe": res.nfe}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
