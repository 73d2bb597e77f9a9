"""``python -m fastfm.evaluate``: test NLL (nats, bits/dim for images) with NFE, and for vector data
a sample-quality distance (energy distance, sliced Wasserstein) to the held-out set and the transport
diagnostics of the sampling solve (kinetic energy, straightness, exact W2^2 prior -> test data), of a
trained run or an exported engine (each computes what it can: ``Sampler.tasks``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastfm.commands.common import inference_parser, low_res_of, open_sampler, run_dataset
from fastfm.inference import nll_report
from fastfm.metrics import sample_quality
from fastfm.runs import path_from_meta
from fastfm.transport import W2_MAX_POINTS, transport_report


def held_out_points(asked: int, available: int, option: str) -> int:
    """How many held-out points to evaluate: ``asked``, at most the ``available`` ones of the run's test split (one
    line on stderr when that cuts the request)."""
    if asked > available:
        print(f"evaluate: only {available} test points in the run's test split: {option} evaluates {available} of "
              f"the {asked} asked", file=sys.stderr)
    return min(asked, available)


def main(argv: list[str] | None = None) -> None:
    p = inference_parser("evaluate", "Evaluate a trained flow matching model on its held-out data: test NLL "
                         "(nats; bits/dim for images) and, for vector data, sample quality.")
    g = p.add_argument_group("evaluation")
    g.add_argument("--n", type=int, default=2000, help="test points for the NLL (at most the run's test split)")
    g.add_argument("--n-samples", type=int, default=2000,
                   help="samples for the quality metrics and the transport diagnostics (vector data; at most the "
                        "run's test split, exact W2^2 on at most 10000)")
    g.add_argument("--out", default=None, help="write the results JSON here as well")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n < 1 or args.n_samples < 1:
            raise ValueError("--n and --n-samples must be >= 1")
        sampler = open_sampler(args)
        meta, tasks = sampler.meta, sampler.tasks
        data = run_dataset(meta)
        sampled = data.kind == "vector" and "sample" in tasks
        if not sampled and "likelihood" not in tasks:
            raise ValueError(f"nothing to evaluate: this sampler can {', '.join(sorted(tasks))}, and sample quality "
                             f"is measured on vector data only ({data.name!r} is {data.kind} data): evaluate with a "
                             "likelihood engine")
        result = {"checkpoint": args.checkpoint, "engine": args.engine, "data": meta["data"]["name"],
                  "path": meta["path"]}
        if "likelihood" not in tasks:
            print(f"evaluate: no test NLL: this sampler can {', '.join(sorted(tasks))} (an interpolant from a data "
                  "set has no prior log-density; an engine, the task it was built for)", file=sys.stderr)
        else:
            n = held_out_points(args.n, len(data.test), "--n")
            test = data.test[:n]
            cond = low_res_of(meta, test)
            if meta["model"].get("num_classes") is not None:
                cond["y"] = data.test_labels[:n]
            result["test"] = {**nll_report(sampler, test, levels=data.levels, seed=args.seed, cond=cond),
                              "n_asked": args.n}
        if sampled:
            n = held_out_points(args.n_samples, len(data.test), "--n-samples")
            cond = {"y": data.test_labels[:n]} if meta["model"].get("num_classes") is not None else {}
            transport = "transport" in tasks
            res = sampler.sample(n, seed=args.seed, cond=cond, transport=transport)
            solved = sampler.describe()
            result["quality"] = {**sample_quality(res.x, data.test[:n], args.seed), "n": n, "n_asked": args.n_samples,
                                 "nfe": res.nfe, **solved}
            if transport:  # the same solve's kinetic energy and straightness; exact W2^2 prior -> test data
                result["transport"] = {**transport_report(res, path_from_meta(meta), data.test, seed=args.seed,
                                                          w2_points=min(n, W2_MAX_POINTS)), **solved}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
