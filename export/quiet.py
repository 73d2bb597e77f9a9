"""Third-party noise silenced while fastfm drives the export tools.

Inside ``quiet()``: FutureWarnings and DeprecationWarnings (torch.export's pytree deprecations), UserWarnings
attributed to torch, onnx, onnxscript or onnxruntime, and log records below ERROR of the exporters' loggers
(the ONNX exporter's "torchvision is not installed"). fastfm's own warnings (``fastfm.hardware.PrecisionWarning``,
the export layer's UserWarnings) pass. onnxruntime's console log is set per session (``backends.ORT_LOG_ERRORS``).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

THIRD_PARTY = r"(torch|onnx|onnxscript|onnx_ir|onnxruntime)(\.|$)"
"""Modules whose UserWarnings are hidden (a regular expression on the module a warning is attributed to)."""
LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


@contextmanager
def quiet() -> Iterator[None]:
    """Hide the third-party warnings and log lines of the export tools for the duration of the block."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", category=UserWarning, module=THIRD_PARTY)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
