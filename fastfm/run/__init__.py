"""A trained run: its typed metadata (model.json), its files (checkpoints, lock) and its loading."""
