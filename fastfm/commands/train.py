"""``python -m fastfm.train``: parse the options (the flags of ``TrainConfig``'s fields, optionally a JSON
config file under them), train (``fastfm.training.trainer``), print a summary line and the final summary as JSON.

Precedence: dataclass defaults < --config FILE < explicit flags; bad input exits with one clear message."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from fastfm.training.config import GROUPS, ConfigError, TrainConfig, flag, from_dict, parse_kv
from fastfm.training.distributed import RankTimeout
from fastfm.training.preemption import Interrupted
from fastfm.training.trainer import train


def _help(f: dataclasses.Field) -> str:
    """A field's help text, allowed range and default in the style of the other commands' --help (no default
    shown for an off flag or an empty dict): "optimizer steps; >= 1 (default: 5000)"."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    allowed = "" if f.metadata["range"] is None else f"; {f.metadata['range']}"
    shown = "" if default is False or default == {} else f" (default: {default})"
    return f"{f.metadata['help']}{allowed}{shown}".replace("%", "%%")


def build_parser(cls: type = TrainConfig, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """Flags from the dataclass fields, in their --help groups: bools become --x/--no-x, dicts repeated
    KEY=VALUE lists."""
    p = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=str, help="JSON file of options (flags override it)")
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        group, kind, help_ = groups[f.metadata["group"]], hints[f.name], _help(f)
        if kind is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_)
        elif kind is dict:
            group.add_argument(flag(f.name), nargs="*", metavar="KEY=VALUE", help=help_)
        else:
            group.add_argument(flag(f.name), type=kind, help=help_)
    return p


def parse_config(argv: list[str] | None = None, cls: type = TrainConfig, description: str = "",
                 prog: str | None = None) -> Any:
    """CLI flags (+ optional JSON file) -> validated config; bad input exits with one clear message."""
    args = vars(build_parser(cls, description, prog).parse_args(sys.argv[1:] if argv is None else argv))
    try:
        values: dict[str, Any] = {}
        if "config" in args:
            path = Path(args.pop("config"))
            try:
                loaded = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read config file {path}: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a JSON object, got {type(loaded).__name__}")
            values.update(loaded)
        for k, v in args.items():
            values[k] = parse_kv(v) if isinstance(v, list) else v
        return from_dict(values, cls).validate()
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def summary_line(summary: dict[str, Any]) -> str:
    """One line: steps, wall time, throughput, last loss and test NLL."""
    last, test = summary["last"], summary["test"]
    nll = f"n/a ({summary['no_test']})" if test is None else (
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

