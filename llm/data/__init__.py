"""Data: the `DataModule` contract, resumable sharded sampling, and the built-in data sets."""
