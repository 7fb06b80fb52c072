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
    assert other is not first and other.site != first.site
    assert other.model is first.model, "another site shares the loaded model"
    assert cache.model_loads == 1
    assert stats.steps == 2 and stats.examples == 2 * cfg.train.batch_size
    assert any(not np.array_equal(trained[k], state[k]) for k in state)


def test_cache_loads_again_only_when_model_or_lora_settings_change(tiny_model_dir: Path) -> None:
    cfg = parse_run_config({"model.name": str(tiny_model_dir), "train.local-steps": 1})
    cache = SessionCache(max_sites=2)
    first = cache.get(cfg, SiteIdentity(None, 0, 3))

    # Other training settings and other sites: same model; the oldest site is evicted
    cache.get(parse_run_config({"model.name": str(tiny_model_dir)}), SiteIdentity(None, 1, 3))
    cache.get(cfg, SiteIdentity(None, 2, 3))
    assert cache.model_loads == 1
    again = cache.get(cfg, SiteIdentity(None, 0, 3))
    assert again is not first and again.model is first.model and cache.model_loads == 1

    # Another LoRA rank: a new model
    other = parse_run_config({"model.name": str(tiny_model_dir), "lora.r": 4})
    assert cache.get(other, SiteIdentity(None, 0, 3)).model is not first.model
    assert cache.model_loads == 2


def test_a_shared_model_trains_a_site_as_its_own_session_would(tiny_model_dir: Path) -> None:
    # A simulation actor serves site 1, then site 0, on one model; a deployed site has a
    # process of its own. Site 0's round must not depend on which of the two it got.
    cfg = parse_run_config({"model.name": str(tiny_model_dir), "train.local-steps": 2})
    cache = SessionCache()
    start = adapter_state(cache.get(cfg, SiteIdentity(None, 1, 2)).model)
    cache.get(cfg, SiteIdentity(None, 1, 2)).train(start, server_round=1, learning_rate=1e-2)
    shared, _ = cache.get(cfg, SiteIdentity(None, 0, 2)).train(start, 1, 1e-2)

    alone, _ = ClientSession(cfg, SiteIdentity(None, 0, 2)).train(start, 1, 1e-2)

    for key in alone:
        np.testing.assert_array_equal(shared[key], alone[key])


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


def test_train_reply_reports_the_data_a_site_holds_and_what_it_trained_on(
    tiny_model_dir: Path,
) -> None:
    # Prepare: a dirichlet split gives sites of different sizes
    from flower_llm import wire
    from flower_llm.train import IGNORE_INDEX

    cfg = parse_run_config(
        {"model.name": str(tiny_model_dir), "train.local-steps": 1, "data.partitioner": "dirichlet"}
    )
    cache = SessionCache()
    sessions = [cache.get(cfg, SiteIdentity(None, p, 3)) for p in range(3)]

    # Execute
    rows = []
    for session in sessions:
        _, stats = session.train(adapter_state(session.model), 1, 1e-3)
        rows.append(session.train_reply_metrics(stats))

    # Assert: n_k is the training set's size; tokens are its response tokens; the
    # "seen" counts are one step of one batch, the same at every site
    for session, row in zip(sessions, rows, strict=True):
        assert row[wire.NUM_EXAMPLES] == len(session.data.train)
        held_tokens = sum(
            sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in session.data.train
        )
        assert row[wire.NUM_TOKENS] == held_tokens
        assert row[wire.NUM_EXAMPLES_SEEN] == cfg.train.batch_size
    assert len({row[wire.NUM_EXAMPLES] for row in rows}) > 1


def test_ffa_trains_b_only_and_sends_b_only(tiny_model_dir: Path) -> None:
    # Prepare
    cfg = parse_run_config(
        {"model.name": str(tiny_model_dir), "train.local-steps": 2, "lora.aggregation": "ffa"}
    )
    session = ClientSession(cfg, SiteIdentity(None, 0, 2))
    start = adapter_state(session.model)

    # Execute
    trained, _ = session.train(start, server_round=1, learning_rate=1e-2)
    sent = session.to_send(trained)

    # Assert: A is exactly the A the server sent; B moved; only B goes up
    a_keys = [k for k in start if ".lora_A." in k]
    assert a_keys and all(np.array_equal(trained[k], start[k]) for k in a_keys)
    assert any(not np.array_equal(trained[k], start[k]) for k in start if ".lora_B." in k)
    assert set(sent) == set(start) - set(a_keys)


def test_a_site_trains_at_its_own_rank_from_the_global_adapter(tiny_model_dir: Path) -> None:
    # Prepare: global rank 8; partition 0 of lora.site-ranks "4,8" trains at rank 4
    from flower_llm.lora_aggregation import rank_of, to_rank

    cfg = parse_run_config(
        {
            "model.name": str(tiny_model_dir),
            "train.local-steps": 2,
            "lora.r": 8,
            "lora.aggregation": "exact",
            "lora.site-ranks": "4,8",
        }
    )
    cache = SessionCache()
    full = cache.get(cfg, SiteIdentity(None, 1, 2))
    start = adapter_state(full.model)
    start = {k: v + 0.01 if ".lora_B." in k else v for k, v in start.items()}
    low = cache.get(cfg, SiteIdentity(None, 0, 2))

    # Execute
    trained, _ = low.train(start, server_round=1, learning_rate=1e-2)
    before = low.evaluate(to_rank(start, 4))
    same = low.evaluate(start)

    # Assert: the site's model and reply are rank 4; it evaluates a global (rank 8)
    # adapter as its rank-4 re-factoring
    assert low.lora.r == 4 and full.lora.r == 8
    assert rank_of(trained) == 4 and rank_of(adapter_state(full.model)) == 8
    assert same.loss == pytest.approx(before.loss, rel=1e-6)
    with pytest.raises(ValueError, match="lora-r"):
        SiteIdentity.from_node_config({"lora-r": "4"})
    with pytest.raises(ValueError, match="lora-r"):
        cfg.lora.site_rank(0, node_rank=16)


def test_evaluating_does_not_change_how_a_session_trains_next(tiny_model_dir: Path) -> None:
    # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it runs
    # in eval mode and trains on the other kernel from then on (flower_llm.models).
    # Prepare: two sessions on separately loaded NF4 models, the same global adapter
    cfg = parse_run_config({"model.name": str(tiny_model_dir), "train.local-steps": 2})
    evaluated = SessionCache().get(cfg, SiteIdentity(None, 0, 2))
    fresh = SessionCache().get(cfg, SiteIdentity(None, 0, 2))
    start = adapter_state(fresh.model)

    # Execute: one evaluates the adapter before its round, the other does not
    evaluated.evaluate(start)
    after_eval, _ = evaluated.train(start, server_round=1, learning_rate=1e-2)
    plain, _ = fresh.train(start, server_round=1, learning_rate=1e-2)

    # Assert: bit for bit the same round
    for key in start:
        np.testing.assert_array_equal(after_eval[key], plain[key], err_msg=key)


def test_memory_advice_lists_each_setting_that_lowers_the_plan(tiny_model_dir: Path) -> None:
    from flower_llm.plan import estimate_memory, load_model_config, memory_advice, run_plan_settings

    config = load_model_config(str(tiny_model_dir))
    cfg = parse_run_config({"model.name": str(tiny_model_dir), "train.batch-size": 8})
    settings = run_plan_settings(cfg)

    advice = memory_advice(config, estimate_memory(config, settings, gpu_bytes=2**20))

    total = estimate_memory(config, settings).total_bytes
    assert advice.startswith(f"flower-llm plan estimates {total / 2**20:.2f} MiB for batch 8 x")
    assert "on this GPU of 1.00 MiB" in advice
    changes = advice.split("; set ")[1].split(", then ")
    assert [c.split(" = ")[0] for c in changes] == [
        "model.gradient-checkpointing",
        "model.fp32-stream",
        "train.batch-size",
    ]
    estimates = [float(c.rsplit(": ", 1)[1].split()[0]) for c in changes]
    assert estimates == sorted(estimates, reverse=True) and estimates[0] < total / 2**20
    # What is already set is not suggested again; with nothing left, the last resorts
    lean = run_plan_settings(
        parse_run_config(
            {
                "model.name": str(tiny_model_dir),
                "model.gradient-checkpointing": True,
                "model.fp32-stream": False,
                "train.batch-size": 1,
            }
        )
    )
    assert memory_advice(config, estimate_memory(config, lean)).endswith(
        "; lower data.max-seq-length or use a larger GPU"
    )


def test_running_out_of_gpu_memory_names_the_settings_and_the_session_goes_on(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUDA's out-of-memory error, raised where a GPU's training or evaluation would raise
    # it (this machine has no GPU to fill)
    import torch

    import flower_llm.client as client
    from flower_llm.plan import OutOfGpuMemory
    from flower_llm.preflight import user_errors

    cfg = parse_run_config({"model.name": str(tiny_model_dir), "train.local-steps": 1})
    session = ClientSession(cfg, SiteIdentity(None, 0, 2))
    state = adapter_state(session.model)
    real_train, real_evaluate = client.train_adapter, client.evaluate

    def full(*_args: object, **_kwargs: object) -> None:
        for param in session.model.parameters():  # gradients of a step cut short
            if param.requires_grad:
                param.grad = torch.ones_like(param)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")

    monkeypatch.setattr(client, "train_adapter", full)
    with pytest.raises(OutOfGpuMemory) as trained:
        session.train(state, server_round=1, learning_rate=1e-2)
    monkeypatch.setattr(client, "evaluate", full)
    with pytest.raises(OutOfGpuMemory) as evaluated:
        session.evaluate(state)

    # The message: what ran out, torch's first line, the plan and what to set
    message = str(trained.value)
    assert message.startswith(
        "out of GPU memory while training (CUDA out of memory. Tried to allocate 20.00 GiB): "
        "flower-llm plan estimates "
    )
    assert "model.gradient-checkpointing = true" in message and "more" not in message
    assert str(evaluated.value).startswith("out of GPU memory while evaluating")
    assert OutOfGpuMemory in user_errors()  # one line in the error reply, not a traceback
    # No gradient is left behind, and the same session trains once memory allows
    assert all(p.grad is None for p in session.model.parameters())
    monkeypatch.setattr(client, "train_adapter", real_train)
    monkeypatch.setattr(client, "evaluate", real_evaluate)
    _, stats = session.train(state, server_round=1, learning_rate=1e-2)
    assert stats.steps == 1 and session.evaluate(state).loss > 0
