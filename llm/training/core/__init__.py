"""The engine and what it is built from: config, registries, callbacks, schedulers, distributed helpers."""
