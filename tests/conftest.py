"""Shared fixtures: one intra-op thread everywhere, an isolated token cache for the session, and the tiny configs
and engines the training tests build (`tiny_config`, `make_engine`)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_config, tiny_engine

# Tiny models gain nothing from intra-op threads, and on a 2-core machine running subprocess tests
# side by side, thread oversubscription made tiny runs ~25x slower. Subprocesses inherit the env var.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Every test starts on one intra-op thread, whatever the one before it left (an in-process run without
    OMP_NUM_THREADS takes its share of the cores), so no tiny model runs oversubscribed."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A token cache of this test's own (`tmp_path/cache`) rather than the session's shared one: for tests that
    look at what gets written there. Modules use it with `pytest.mark.usefixtures("own_cache")`."""
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Token caches of the whole session go to one temporary directory (shared between tests)."""
    os.environ.setdefault("LLM_CACHE_DIR", str(tmp_path_factory.mktemp("llm-cache")))
    yield


@pytest.fixture(autouse=True)
def _llm_logger_restored():
    """An in-process run sets up the "llm" logger (no propagation, a file handler into its run directory); put it
    back after each test, so that the next test's caplog sees its records and no run's train.log stays open."""
    logger = logging.getLogger("llm")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the modules longest first (most `slow` tests, then most tests), so that with `--dist loadfile
    --no-loadscope-reorder` (the Makefile) the long modules start early and the two workers finish together. The
    order of the tests within a module is kept."""
    slow: Counter[str] = Counter(str(item.fspath) for item in items if item.get_closest_marker("slow"))
    count: Counter[str] = Counter(str(item.fspath) for item in items)
    items.sort(key=lambda item: (-slow[str(item.fspath)], -count[str(item.fspath)]))  # a stable sort


TinyConfig = Callable[..., tuple[Any, type]]


@pytest.fixture
def tiny_config(tmp_path: Path) -> TinyConfig:
    """`tiny_config(*flags, base=None)`: (config, task_class) parsed as the CLI would from the tiny regression run's
    flags (`helpers.TINY_REGRESSION`, or `base`) plus `flags`, with the run directory `tmp_path/run`."""

    def make(*flags: str, base: list[str] | None = None) -> tuple[Any, type]:
        return make_config(tmp_path, *flags, base=base)

    return make


@pytest.fixture
def make_engine(tmp_path: Path) -> Callable[..., Any]:
    """`make_engine(*flags, ...)`: `helpers.tiny_engine` working under this test's tmp_path (or `workdir=`)."""

    def make(*flags: str, workdir: Path | None = None, **options: Any) -> Any:
        return tiny_engine(workdir or tmp_path, *flags, **options)

    return make
