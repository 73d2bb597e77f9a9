"""One ``--help`` style for every ``python -m fastfm.X`` command: defaults shown, except where there is none."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults-in-help formatter, silent for options whose default is None or a flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``python -m fastfm.<command>``, with that usage line and this help style."""
    return argparse.ArgumentParser(prog=f"python -m fastfm.{command}", description=description,
                                   formatter_class=HelpFormatter)
