"""``python -m fastfm.export``: launches ``fastfm.commands.export`` (the entry-point layer)."""

from fastfm.commands.export import main

if __name__ == "__main__":
    main()
