"""Shared fixtures: offline hub, a tiny model built once per session."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny Llama + tokenizer, built from code into a temp dir."""
    from flower_llm.embedded import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", autouse=True)
def isolated_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep `model.name = "embedded"` builds out of the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("flower-llm-cache")
    os.environ["FLOWER_LLM_CACHE"] = str(cache)
    return cache
