"""Shared fixtures: offline hub, a tiny model built once per session."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def stamped_task_identity() -> Iterator[None]:
    """Stamp messages made in this process with run 1, node 0, task 1, as a ClientApp or
    ServerApp process would; Flower's own values come back afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_node_id", "_task_id")
    saved = [getattr(TaskIdentity, name) for name in names]
    for name, value in zip(names, (1, 0, 1), strict=True):
        setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(TaskIdentity, name, value)
