"""``python -m fastfm.reflow``: the couplings (x0, X_{0->1}(x0)) of a trained flow as a ``reflow:DIR`` data set
(``fastfm.training.reflow``); prints a JSON summary. Run again after an interruption to finish the generation."""

from __future__ import annotations

import json
import sys

from fastfm.commands import helpformat
from fastfm.commands.common import open_sampler
from fastfm.solve import DEFAULTS
from fastfm.solve.settings import DEFAULT_STEPS_HELP
from fastfm.solve.solvers import DEFAULT_SOLVER, FLOW_MAP, SOLVERS
from fastfm.training.reflow import SHARD_SIZE, generate_pairs

N_PAIRS = 10_000


def main(argv: list[str] | None = None) -> None:
    p = helpformat.parser("reflow", "Pair prior draws x0 with the teacher's ODE solution X_{0->1}(x0) (reflow, Liu et "
                                    "al. 2022): writes DIR/reflow.json and DIR/pairs-*.safetensors; train on them "
                                    "with python -m fastfm.train --data reflow:DIR --init RUN.")
    p.add_argument("--teacher", dest="checkpoint", metavar="RUN", required=True,
                   help="run directory of the trained flow (its EMA weights)")
    p.add_argument("--out", required=True, help="output directory (a generation there is finished, or replaced "
                                                "with --force)")
    p.add_argument("--n", type=int, default=N_PAIRS, help="number of pairs")
    p.add_argument("--solver", default=None, choices=SOLVERS,
                   help=f"solver: {SOLVERS.help_text()} (default: {DEFAULT_SOLVER}; {FLOW_MAP} for a flow-map model)")
    p.add_argument("--steps", type=int, default=None, help=f"solver steps (default: {DEFAULT_STEPS_HELP})")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="pairs per shard file")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draws")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="points per solver call")
    p.add_argument("--engine", default=None,
                   help="engine directory from python -m fastfm.export --task sample of the teacher, run instead of "
                        "the eager solver (it fixes the solver and steps)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (eager solver)")
    p.add_argument("--force", action="store_true", help="replace another generation in --out")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        engine = open_sampler(args, "sample") if args.engine else None
        solve = {} if engine else {"solver": args.solver, "steps": args.steps}
        summary = generate_pairs(args.checkpoint, args.out, n=args.n, shard_size=args.shard_size, seed=args.seed,
                                 batch_size=args.batch_size, device=args.device, engine=engine, force=args.force,
                                 **solve)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted: the finished shards in {args.out} are kept; run the same command again to "
                         "finish") from None
    print(json.dumps(summary))
