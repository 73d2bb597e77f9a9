"""``python -m fastfm.reflow``: launches ``fastfm.commands.reflow`` (the entry-point layer)."""

from fastfm.commands.reflow import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
