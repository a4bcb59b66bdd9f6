"""Training: the CLI entry (`train.py`), the engine and its pieces (`core/`), and the tasks (`tasks/`)."""
