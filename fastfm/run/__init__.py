"""A trained run: its typed metadata (model.json), its files (checkpoints, lock) and its loading."""

from .load import LoadedRun, load_run
from .meta import RunMeta

__all__ = ["LoadedRun", "RunMeta", "load_run"]
