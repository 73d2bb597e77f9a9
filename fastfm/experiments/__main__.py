"""``python -m fastfm.experiments NAME|all``: run the papers' experiments and write their reports."""

from __future__ import annotations

import argparse
import sys

from fastfm.experiments import EXPERIMENTS, run_experiment
from fastfm.experiments.common import SCALES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastfm.experiments", description=__doc__)
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help=f"'all', or experiments: {EXPERIMENTS.help_text()}")
    parser.add_argument("--scale", default="cpu", choices=SCALES,
                        help="tiny (seconds, for tests), cpu (default: the whole set in about 45 minutes on 2 CPU "
                             "cores), gpu (one GPU, under 10 minutes)")
    parser.add_argument("--out", default="runs/experiments", help="folder of the reports (one subfolder each)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every run")
    args = parser.parse_args(argv)
    names = list(EXPERIMENTS) if args.names == ["all"] else args.names
    for name in names:
        if name not in EXPERIMENTS:
            parser.error(f"unknown experiment {name!r}; choose 'all' or one of {', '.join(EXPERIMENTS)}")
    for name in names:
        report = run_experiment(name, scale=args.scale, out=args.out, device=args.device, seed=args.seed)
        print(f"{name}: {report}", file=sys.stderr)


if __name__ == "__main__":
    main()
