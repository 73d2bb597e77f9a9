"""A run's metrics as TensorBoard event files under OUT/tensorboard, written by PyTorch's ``SummaryWriter`` (needs
the ``tensorboard`` package: ``pip install 'fastfm[tensorboard]'``): one ``write`` per metrics.jsonl record.

Every number of a record becomes a scalar at the record's step (strings, lists and None are left out):

    {"header": {...}}                 text run/header (the JSON) at the step the process started from
    {"step": N, "loss": .., ...}      train/<key> at N: train/loss, train/lr, train/samples_per_s, ...
    {"step": N, "eval": {...}}        eval/<key>, eval/<section>/<key> at N: eval/test/nll_nats,
                                      eval/test/bits_per_dim, eval/quality/energy_distance, eval/sample_nfe, ...
    {"final": {...}}                  as an evaluation, at the run's last step ("steps"); the run summary beside it
                                      (FINAL_RUN_KEYS) is left out

A resumed run's header (``resumed_at`` S) opens its event file with purge step S + 1, so TensorBoard hides what
the killed process logged after the checkpoint, as metrics.jsonl drops those rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

LOGDIR = "tensorboard"
FINAL_RUN_KEYS = frozenset({"steps", "world", "wall_s", "last", "skipped_steps"})
"""What a final record adds to its evaluation: the step count, and a summary of the training already logged."""


class TensorBoardMissing(ImportError, ValueError):
    """The tensorboard package is not installed (a ValueError too: the entry points report it in one line)."""


def scalars(prefix: str, values: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) of every number in ``values``, nested dicts as tag paths: ("eval", {"test": {"n": 5}}) gives
    ("eval/test/n", 5.0)."""
    for key, value in values.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, dict):
            yield from scalars(tag, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


class TensorBoardLog:
    """TensorBoard event files of the run in ``out`` (in ``out``/tensorboard), fed the metrics.jsonl records."""

    def __init__(self, out: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("tensorboard"):
                raise
            raise TensorBoardMissing("TensorBoard event files need the tensorboard package: pip install tensorboard "
                                     "(or pip install 'fastfm[tensorboard]')") from None
        self.log_dir = Path(out) / LOGDIR
        self._summary_writer = SummaryWriter
        self._writer: Any = None  # opened by the first record: a header gives the purge step

    def _open(self, purge_step: int | None = None) -> Any:
        if self._writer is None:
            self._writer = self._summary_writer(log_dir=str(self.log_dir), purge_step=purge_step)
        return self._writer

    def write(self, record: dict[str, Any]) -> None:
        """Log one metrics.jsonl record (the module's mapping); flushed to disk at once, like the jsonl line."""
        if "header" in record:
            start = record["header"].get("resumed_at")
            writer = self._open(None if start is None else start + 1)
            writer.add_text("run/header", f"```\n{json.dumps(record['header'], indent=2)}\n```", start or 0)
        else:
            if "final" in record:
                step, prefix = record["final"]["steps"], "eval"
                values = {k: v for k, v in record["final"].items() if k not in FINAL_RUN_KEYS}
            elif "eval" in record:
                step, prefix, values = record["step"], "eval", record["eval"]
            else:
                step, prefix = record["step"], "train"
                values = {k: v for k, v in record.items() if k != "step"}
            writer = self._open()
            for tag, value in scalars(prefix, values):
                writer.add_scalar(tag, value, step)
        writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
