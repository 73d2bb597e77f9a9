"""``python -m fastfm.evaluate``: launches ``fastfm.commands.evaluate`` (the entry-point layer)."""

from fastfm.commands.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
