"""Shared fixtures: an isolated token cache for the whole session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Token caches of the whole session go to one temporary directory (shared between tests)."""
    os.environ.setdefault("LLM_CACHE_DIR", str(tmp_path_factory.mktemp("llm-cache")))
    yield
