"""SIGTERM (what schedulers send before they kill a job) and SIGINT (Ctrl-C) during training: noted by a
handler, acted on at the end of the step the training loop is in (every rank agrees on that step), so the
run stops with a checkpoint and exits non-zero (128 + the signal's number, as a shell reports it). A second
signal of the same kind acts at once, as it would without the handler."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignal:
    """``with StopSignal() as stop:`` ... ``stop.signum``: 0, or the first SIGTERM/SIGINT received inside."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        signal.signal(signum, self._previous[signum])  # type: ignore[arg-type]  # a second one acts at once

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()
