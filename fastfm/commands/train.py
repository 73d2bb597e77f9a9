"""``python -m fastfm.train``: parse the options (``fastfm.config``), train (``fastfm.trainer``), print a summary
line and the final summary as JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

from fastfm.config import TrainConfig, parse_config
from fastfm.distributed import RankTimeout
from fastfm.preemption import Interrupted
from fastfm.trainer import train


def summary_line(summary: dict[str, Any]) -> str:
    """One line: steps, wall time, throughput, last loss and test NLL."""
    last, test = summary["last"], summary["test"]
    nll = "n/a (no source density)" if test is None else (
        f"{test['nll_nats']:.4f} nats (+- {test['nll_nats_stderr']:.4f}, NFE {test['nfe']})"
        + (f", {test['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in test else ""))
    return (f"done: {summary['steps']} steps on {summary['world']} process(es) in {summary['wall_s']:.1f} s, "
            f"{last.get('samples_per_s', 0):.0f} samples/s, loss {last.get('loss') or float('nan'):.4f}, "
            f"skipped {summary['skipped_steps']}; test NLL: {nll}; samples: {summary['samples_png']}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, TrainConfig, "Train a flow matching model.", prog="python -m fastfm.train")
    try:
        summary = train(cfg)
    except (ValueError, OSError, RankTimeout) as e:  # bad input, a file that cannot be written, a hung rank
        raise SystemExit(f"error: {e}") from None
    except Interrupted as e:  # SIGTERM / SIGINT in the loop: a checkpoint was written
        print(e, file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C before the first step or after the last checkpoint
        print(f"interrupted: {cfg.out} keeps its last committed checkpoint, if it has one (--resume continues "
              "from it)", file=sys.stderr)
        raise SystemExit(130) from None
    if summary:
        print(summary_line(summary))
        print(json.dumps(summary))

