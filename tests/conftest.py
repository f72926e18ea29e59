"""Shared fixtures: tiny random models (built offline once per session) and an isolated deccp cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root):
    """Factory: tiny_model_dir("qwen2") -> a saved tiny random model directory."""
    from deccp.tiny import build_tiny_model

    made: dict[tuple, Path] = {}

    def make(arch: str = "qwen2", **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in made:
            name = f"{arch}-" + "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
            made[key] = build_tiny_model(arch, tiny_root / name.rstrip("-"), **kwargs)
        return made[key]

    return make


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A fresh DECCP_CACHE for tests that must not see or touch the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DECCP_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real default model (fetched and converted on first use, then cached)."""
    from deccp.models import resolve_model

    return resolve_model("default")


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
