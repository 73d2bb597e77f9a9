"""``python -m fastfm.train``: launches ``fastfm.commands.train`` (the entry-point layer)."""

from fastfm.commands.train import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
