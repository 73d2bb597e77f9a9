"""``python -m fastfm.sample``: launches ``fastfm.commands.sample`` (the entry-point layer)."""

from fastfm.commands.sample import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
