"""``python -m fastfm.evaluate``: test NLL (nats, bits/dim for images) with NFE, and for vector data
a sample-quality distance (energy distance, sliced Wasserstein) to the held-out set and the transport
diagnostics of the sampling solve (kinetic energy, straightness, exact W2^2 prior -> test data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastfm.cli import inference_parser, low_res_of, run_dataset, setup, setup_engine
from fastfm.evaluation import (engine_generate, engine_nll, generate, sample_quality, steps_run, test_nll,
                               transport_report)
from fastfm.transport import W2_MAX_POINTS


def main(argv: list[str] | None = None) -> None:
    p = inference_parser("evaluate", "Evaluate a trained flow matching model on its held-out data: test NLL "
                         "(nats; bits/dim for images) and, for vector data, sample quality.")
    g = p.add_argument_group("evaluation")
    g.add_argument("--n", type=int, default=2000, help="test points for the NLL")
    g.add_argument("--n-samples", type=int, default=2000,
                   help="samples for the quality metrics and the transport diagnostics (vector data; exact W2^2 "
                        "on at most 10000)")
    g.add_argument("--out", default=None, help="write the results JSON here as well")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n < 1 or args.n_samples < 1:
            raise ValueError("--n and --n-samples must be >= 1")
        # A likelihood engine gives the test NLL, a sampling engine the sample quality (vector data).
        engine = setup_engine(args, None) if args.engine else None
        run = None if engine else setup(args)
        meta = engine.meta if engine else run.meta
        data = run_dataset(meta)
        if engine and engine.spec.task == "sample" and data.kind != "vector":
            raise ValueError(f"a sampling engine gives sample-quality metrics of vector data only; {data.name!r} "
                             "is image data: evaluate with a likelihood engine")
        classes = meta["model"].get("num_classes")
        result = {"checkpoint": args.checkpoint, "data": meta["data"]["name"], "path": meta["path"]}
        if engine:
            result["engine"] = args.engine
        if engine is None or engine.spec.task == "likelihood":
            test = data.test[: args.n]
            cond = low_res_of(meta, test)
            if classes is not None:
                cond["y"] = data.test_labels[: args.n]
            if engine:
                result["test"] = engine_nll(engine, test, levels=data.levels, seed=args.seed, cond=cond)
            else:
                result["test"] = test_nll(run.model, run.path, test, target=meta["target"], levels=data.levels,
                                          method=args.solver, grid=args.grid, steps=args.steps,
                                          divergence=args.divergence, n_probes=args.probes,
                                          batch_size=args.batch_size, seed=args.seed, cond=cond)
        if data.kind == "vector" and (engine is None or engine.spec.task == "sample"):
            n = min(args.n_samples, len(data.test))
            cond_s = {"y": data.test_labels[:n]} if classes is not None else {}
            if engine:
                res = engine_generate(engine, n, seed=args.seed, cond=cond_s)
            else:
                res = generate(run.model, run.path, n, run.shape, target=meta["target"], method=args.solver,
                               grid=args.grid, steps=args.steps, seed=args.seed, cond=cond_s,
                               batch_size=args.batch_size, transport=True)
            solved = {"solver": args.solver, "steps": steps_run(args.solver, args.steps, args.grid)}
            result["quality"] = {**sample_quality(res.x, data.test[:n], args.seed), "n": n, "nfe": res.nfe, **solved}
            if not engine:  # the same solve's kinetic energy and straightness; exact W2^2 prior -> test data
                result["transport"] = {**transport_report(res, run.path, data.test, seed=args.seed,
                                                          w2_points=min(n, W2_MAX_POINTS)), **solved}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
