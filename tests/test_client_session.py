"""A site's session: the base model loads once per process and is reused across rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flower_llm.adapters import adapter_state
from flower_llm.client import ClientSession, SessionCache, SiteIdentity
from flower_llm.config import parse_run_config


def test_cache_reuses_the_loaded_model_across_rounds(tiny_model_dir: Path) -> None:
    # Prepare
    cfg = parse_run_config({"model.name": str(tiny_model_dir), "train.local-steps": 2})
    site = SiteIdentity(None, 0, 2)
    cache = SessionCache()

    # Execute: two rounds' worth of lookups, then a different site
    first = cache.get(cfg, site)
    state = adapter_state(first.model)
    trained, stats = first.train(state, server_round=1, learning_rate=1e-2)
    second = cache.get(cfg, site)
    other = cache.get(cfg, SiteIdentity(None, 1, 2))

    # Assert
    assert second is first and second.base.model is first.base.model
    assert other is not first
    assert stats.steps == 2 and stats.examples == 2 * cfg.train.batch_size
    assert any(not np.array_equal(trained[k], state[k]) for k in state)


def test_same_round_same_batches_so_training_is_reproducible(tiny_model_dir: Path) -> None:
    cfg = parse_run_config({"model.name": str(tiny_model_dir), "train.local-steps": 2})
    session = ClientSession(cfg, SiteIdentity(None, 0, 1))
    start = adapter_state(session.model)
    a, _ = session.train(start, server_round=2, learning_rate=1e-2)
    b, _ = session.train(start, server_round=2, learning_rate=1e-2)
    c, _ = session.train(start, server_round=3, learning_rate=1e-2)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("node_config", "match"),
    [
        ({"partition-id": 4, "num-partitions": 4}, "partition-id"),
        ({"data-path": 3}, "data-path"),
    ],
)
def test_bad_node_config_is_named(node_config: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SiteIdentity.from_node_config(node_config)


def test_missing_site_data_file_fails_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = parse_run_config({"model.name": str(tiny_model_dir)})
    site = SiteIdentity.from_node_config({"data-path": str(tmp_path / "site-b.jsonl")})
    with pytest.raises(FileNotFoundError, match=r"site-b\.jsonl"):
        ClientSession(cfg, site)
