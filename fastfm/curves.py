"""``python -m fastfm.curves``: launches ``fastfm.commands.curves`` (the entry-point layer)."""

from fastfm.commands.curves import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
