"""``python -m fastfm.evaluate``: test NLL (nats, bits/dim for images) with NFE, and for vector data
a sample-quality distance (energy distance, sliced Wasserstein) to the held-out set and the transport
diagnostics of the sampling solve (kinetic energy, straightness, exact W2^2 prior -> test data), of a
trained run or an exported engine (each computes what it can: ``Sampler.capabilities``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastfm.commands.common import inference_parser, open_sampler
from fastfm.evaluation.report import W2_EVAL_POINTS, evaluate
from fastfm.run.load import dataset_of
from fastfm.solve.settings import SAMPLE_COUNTS


def _capped(asked: int, available: int, option: str) -> None:
    """One line on stderr where the run's test split cuts a request."""
    if asked > available:
        print(f"evaluate: only {available} test points in the run's test split: {option} evaluates {available} of "
              f"the {asked} asked", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = inference_parser("evaluate", "Evaluate a trained flow matching model on its held-out data: test NLL "
                         "(nats; bits/dim for images) and, for vector data, sample quality.")
    g = p.add_argument_group("evaluation")
    g.add_argument("--n", type=int, default=2000, help="test points for the NLL (at most the run's test split)")
    g.add_argument("--n-samples", type=int, default=SAMPLE_COUNTS["vector"],
                   help=f"samples for the quality metrics and the transport diagnostics (vector data; at most the "
                        f"run's test split, exact W2^2 on at most {W2_EVAL_POINTS})")
    g.add_argument("--out", default=None, help="write the results JSON here as well")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.n < 1 or args.n_samples < 1:
            raise ValueError("--n and --n-samples must be >= 1")
        sampler = open_sampler(args)
        meta, tasks = sampler.meta, sampler.capabilities
        data = dataset_of(meta)
        sampled = data.kind == "vector" and "sample" in tasks
        if not sampled and "likelihood" not in tasks:
            raise ValueError(f"nothing to evaluate: this sampler can {', '.join(sorted(tasks))}, and sample quality "
                             f"is measured on vector data only ({data.name!r} is {data.kind} data): evaluate with a "
                             "likelihood engine")
        if "likelihood" not in tasks:
            print(f"evaluate: no test NLL: this sampler can {', '.join(sorted(tasks))} (a flow map has no "
                  "density without the ODE; an interpolant from a data set has no prior log-density; an engine, the "
                  "task it was built for)", file=sys.stderr)
        else:
            _capped(args.n, len(data.test), "--n")
        if sampled:
            _capped(args.n_samples, len(data.test), "--n-samples")
        report, res = evaluate(sampler, data, n_samples=args.n_samples if sampled else None, n_nll=args.n,
                               seed=args.seed)
        if res is not None:  # what drew the samples, beside what was measured on them
            solved = sampler.describe("sample")
            report["quality"].update(n=len(res.x), n_asked=args.n_samples, nfe=res.nfe, **solved)
            if "transport" in report:
                report["transport"].update(solved)
        result = {"checkpoint": args.checkpoint, "engine": args.engine, "data": meta.data.name,
                  "path": {"name": meta.path, "args": meta.path_args}, **report}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
