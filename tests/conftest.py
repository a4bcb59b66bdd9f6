"""Shared fixtures: one intra-op thread everywhere, and an isolated token cache for the session."""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a 2-core machine running subprocess tests
# side by side, thread oversubscription made tiny runs ~25x slower. Subprocesses inherit the env var.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Token caches of the whole session go to one temporary directory (shared between tests)."""
    os.environ.setdefault("LLM_CACHE_DIR", str(tmp_path_factory.mktemp("llm-cache")))
    yield
