"""The site-side state store: round trips, atomic writes, clear errors; and a DP-SGD run
interrupted and resumed reports the same per-site epsilon as an uninterrupted one, through
the ClientApp's train handler with real Flower Messages and Contexts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from flower_llm import wire
from flower_llm.adapters import adapter_state
from flower_llm.client import DPSGD_ACCOUNTANT_ENTRY, SiteIdentity, continued_entry
from flower_llm.config import parse_run_config
from flower_llm.privacy import epsilon_after
from flower_llm.site_state import (
    SITE_STATE_DIR_KEY,
    SiteStateEntry,
    SiteStateError,
    SiteStateStore,
    default_site_state_dir,
    run_key,
    site_state_dir,
)

# --------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------


def test_an_entry_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    # Prepare
    store = SiteStateStore(tmp_path, "my-run", "partition-0-of-2")
    data = {"accountant": {"events": [[1.0, 0.25, 3]]}, "last-round": 3}

    # Execute
    assert store.load("dpsgd-accountant") is None
    path = store.save("dpsgd-accountant", data, run_id=17)
    store.save("dpsgd-accountant", {**data, "last-round": 4}, run_id=18)
    entry = store.load("dpsgd-accountant")

    # Assert
    assert path == tmp_path / "my-run" / "partition-0-of-2" / "dpsgd-accountant.json"
    assert entry is not None
    assert entry.data == {**data, "last-round": 4}
    assert entry.run_id == 18
    assert sorted(p.name for p in path.parent.iterdir()) == ["dpsgd-accountant.json"]


def test_a_failed_write_keeps_the_old_entry_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    store = SiteStateStore(tmp_path, "run", "site")
    store.save("x", {"v": 1}, 1)

    def crash(*_: object) -> None:
        raise OSError("disk full")

    # Execute: NaN is not JSON, so the first save fails before writing; the second fails
    # after the temporary file is written, at the rename
    with pytest.raises(ValueError):
        store.save("x", {"v": float("nan")}, 2)
    monkeypatch.setattr("flower_llm.site_state.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save("x", {"v": 3}, 3)
    monkeypatch.undo()

    # Assert
    entry = store.load("x")
    assert entry is not None and entry.data == {"v": 1} and entry.run_id == 1
    assert [p.name for p in store.directory.iterdir()] == ["x.json"]


def test_runs_and_sites_never_share_a_file(tmp_path: Path) -> None:
    # Prepare
    a = SiteStateStore(tmp_path, "run-a", "partition-0-of-2")
    b = SiteStateStore(tmp_path, "run-b", "partition-0-of-2")
    c = SiteStateStore(tmp_path, "run-a", "partition-1-of-2")

    # Execute
    a.save("x", {"v": 1}, 1)

    # Assert
    assert b.load("x") is None
    assert c.load("x") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"format": "flower-llm/site-state", "vers', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "holds a list"),
        (b'{"format": "other"}', "format 'other'"),
    ],
)
def test_a_corrupt_file_is_an_error_that_names_it(
    tmp_path: Path, content: bytes, message: str
) -> None:
    # Prepare
    store = SiteStateStore(tmp_path, "run", "site")
    store.path("x").parent.mkdir(parents=True)
    store.path("x").write_bytes(content)

    # Execute / Assert
    with pytest.raises(SiteStateError, match=message) as err:
        store.load("x")
    assert str(store.path("x")) in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version 2"),
        ({"site": "partition-1-of-2"}, "belongs to site"),
        ({"name": "other"}, "belongs to name"),
        ({"run-id": "7"}, "malformed"),
        ({"extra": 1}, "keys"),
    ],
)
def test_a_file_of_another_version_or_owner_is_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    # Prepare
    store = SiteStateStore(tmp_path, "run", "site")
    path = store.save("x", {"v": 1}, 3)
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, **change}))

    # Execute / Assert
    with pytest.raises(SiteStateError, match=message):
        store.load("x")


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "a..b", "x" * 201])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="site-state"):
        SiteStateStore(tmp_path, name, "site")
    with pytest.raises(ValueError, match="site-state"):
        SiteStateStore(tmp_path, "run", "site").save(name, {}, 1)


def test_run_key_keeps_plain_names_and_hashes_the_others() -> None:
    assert run_key("exp-1", 5) == "exp-1"
    assert run_key("", 5) == "run-5"
    odd = run_key("team a/exp 1", 5)
    assert odd.startswith("team_a_exp_1-")
    assert odd != run_key("team a exp 1", 5)
    SiteStateStore("/tmp", odd, "site")  # a valid directory name


def test_the_root_comes_from_node_config_or_the_project_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWER_LLM_CACHE", str(tmp_path / "cache"))
    assert default_site_state_dir() == tmp_path / "cache" / "site-state"
    assert site_state_dir({}) == tmp_path / "cache" / "site-state"
    assert site_state_dir({SITE_STATE_DIR_KEY: str(tmp_path / "s")}) == tmp_path / "s"
    with pytest.raises(ValueError, match=SITE_STATE_DIR_KEY):
        site_state_dir({SITE_STATE_DIR_KEY: 3})


def test_site_keys_are_stable_and_distinct(tmp_path: Path) -> None:
    assert SiteIdentity(None, 1, 4).key() == "partition-1-of-4"
    a = SiteIdentity(str(tmp_path / "a" / "train.jsonl")).key()
    b = SiteIdentity(str(tmp_path / "b" / "train.jsonl")).key()
    assert a.startswith("data-train.jsonl-")
    assert a != b
    assert a == SiteIdentity(str(tmp_path / "a" / ".." / "a" / "train.jsonl")).key()


# --------------------------------------------------------------------------------------
# A DP-SGD run interrupted and resumed, through the ClientApp
# --------------------------------------------------------------------------------------

SITES = 2
SIGMA, DELTA = 1.2, 1e-5


@pytest.fixture
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instructions are stamped with the run and node of the process that makes them."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_config(model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model.name": str(model_dir),
        "privacy.dpsgd": True,
        "privacy.dpsgd-noise-multiplier": SIGMA,
        "privacy.dpsgd-delta": DELTA,
        "train.local-steps": 2,  # 2 rounds x 2 steps
        "train.batch-size": 4,
        "output.run-name": "dpsgd-resume",
        **extra,
    }


def train_round(
    contexts: list[Context], server_round: int, global_record: Any
) -> list[dict[str, float]]:
    """Send one train Message to every site's ClientApp; return each reply's epsilons."""
    from client_apps.qlora import app

    out = []
    for node, context in enumerate(contexts):
        content = RecordDict(
            {
                wire.ARRAYS: global_record,
                wire.CONFIG: ConfigRecord(
                    {wire.SERVER_ROUND: server_round, wire.LEARNING_RATE: 1e-3}
                ),
            }
        )
        msg = Message(content, dst_node_id=node + 1, message_type=MessageType.TRAIN)
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        metrics = reply.content[wire.METRICS]
        out.append(
            {
                key: float(metrics[key])  # type: ignore[arg-type]
                for key in (wire.DPSGD_EPSILON, wire.DPSGD_PLD_EPSILON, wire.DPSGD_RDP_EPSILON)
            }
        )
    return out


def site_contexts(run_id: int, cfg: dict[str, Any], root: Path) -> list[Context]:
    """Fresh Contexts, as Flower gives a new run: empty node state."""
    from benchmarks.sites import site_contexts as fresh

    return fresh(run_id, cfg, root, SITES)


@pytest.mark.usefixtures("server_task_identity")
def test_a_resumed_dpsgd_run_reports_the_epsilon_of_an_uninterrupted_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the global adapter every round starts from (accounting does not depend on it)
    from client_apps.qlora import session_for

    cfg = run_config(tiny_model_dir)
    sessions = [session_for(context) for context in site_contexts(1, cfg, tmp_path / "probe")]
    global_record = wire.to_array_record(adapter_state(sessions[0].model))
    # Each step samples each example with q = 1 / ceil(n / batch size)
    rates = [1 / -(-s.data.num_train_examples // 4) for s in sessions]

    # Execute: two rounds straight; one round, then a new Flower run (empty node state)
    # resuming with round 2
    straight = [
        train_round(site_contexts(11, cfg, tmp_path / "a"), r, global_record) for r in (1, 2)
    ]
    first = train_round(site_contexts(21, cfg, tmp_path / "b"), 1, global_record)
    resumed_cfg = run_config(tiny_model_dir, **{"output.resume": True})
    resumed = train_round(site_contexts(22, resumed_cfg, tmp_path / "b"), 2, global_record)

    # Assert: the same per-site epsilons under both accountants, 4 steps' worth
    assert first == straight[0]
    assert resumed == straight[1]
    for site in range(SITES):
        four_steps = epsilon_after(4, SIGMA, rates[site], DELTA)
        assert resumed[site][wire.DPSGD_EPSILON] == pytest.approx(four_steps, rel=1e-12)
        assert resumed[site][wire.DPSGD_PLD_EPSILON] == resumed[site][wire.DPSGD_EPSILON]
        assert resumed[site][wire.DPSGD_RDP_EPSILON] > resumed[site][wire.DPSGD_PLD_EPSILON]
        assert resumed[site][wire.DPSGD_EPSILON] > first[site][wire.DPSGD_EPSILON]
    kept = tmp_path / "b" / "dpsgd-resume" / "partition-1-of-2" / f"{DPSGD_ACCOUNTANT_ENTRY}.json"
    document = json.loads(kept.read_text())
    assert (document["run-id"], document["data"]["last-round"]) == (22, 2)
    assert parse_run_config(resumed_cfg).output.resume


@pytest.mark.usefixtures("server_task_identity")
def test_the_secagg_client_trains_with_dpsgd_like_the_plain_client(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the SecAgg+ client of site 0, as its masked-vectors stage builds it
    from client_apps.qlora import session_and_keys
    from client_apps.secagg import SecAggClient
    from flower_llm import secagg

    secagg_cfg = run_config(
        tiny_model_dir,
        **{
            "fed.aggregation": "secagg+",
            "fed.max-weight": 1000.0,  # bounds any partition of the 900 embedded examples
            "output.local-only-baseline": False,
        },
    )
    context = site_contexts(41, secagg_cfg, tmp_path / "secagg")[0]
    trainer, keys = session_and_keys(context)
    start = adapter_state(trainer.session.model)  # type: ignore[attr-defined]
    fit_config = {
        wire.SERVER_ROUND: 1,
        wire.LEARNING_RATE: 1e-3,
        secagg.CLIPPING_RANGE: 1.0,
        secagg.MAX_WEIGHT: 1000.0,
    }

    # Execute: one SecAgg+ fit, and the plain ClientApp's round 1 at the same site
    masked_input, weight, _ = SecAggClient(trainer, keys).fit(
        secagg.state_to_arrays({k: start[k] for k in keys}), fit_config
    )
    plain = train_round(
        site_contexts(42, run_config(tiny_model_dir), tmp_path / "plain"),
        1,
        wire.to_array_record(start),
    )

    # Assert: the site kept an accountant of the round's two DP-SGD steps, with the epsilon
    # the plain client reports for the same site and round; the update left encoded
    kept = tmp_path / "secagg" / "dpsgd-resume" / "partition-0-of-2" / "dpsgd-accountant.json"
    document = json.loads(kept.read_text())
    assert (document["run-id"], document["data"]["last-round"]) == (41, 1)
    from flower_llm.privacy import DualAccountant

    accountant = DualAccountant.from_checkpoint(document["data"]["accountant"], "pld")
    assert accountant.rounds == 2
    assert accountant.epsilon() == pytest.approx(plain[0][wire.DPSGD_EPSILON], rel=1e-12)
    assert len(masked_input) == len(keys) + 1  # the update's arrays and the masked metrics
    assert 1 <= weight <= 1000


# --------------------------------------------------------------------------------------
# Which kept state a round continues
# --------------------------------------------------------------------------------------


def entry(run_id: int, last_round: int = 1) -> SiteStateEntry:
    return SiteStateEntry(data={"accountant": {}, "last-round": last_round}, run_id=run_id)


@pytest.mark.parametrize(
    ("kept", "run_id", "resume", "continues"),
    [
        (None, 5, False, False),
        (entry(5), 5, False, True),  # a later round of the same Flower run
        (entry(4), 5, True, True),  # a resumed run continues the interrupted one
        (entry(4), 5, False, False),  # a fresh run of the same name starts afresh
    ],
)
def test_a_round_continues_its_own_run_or_the_run_it_resumes(
    kept: SiteStateEntry | None, run_id: int, resume: bool, continues: bool
) -> None:
    out = continued_entry(kept, run_id, resume, 2, Path("x.json"))
    assert (out is kept) if continues else (out is None)


def test_a_round_trained_before_the_interruption_is_counted_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kept = entry(4, last_round=3)
    with caplog.at_level("WARNING"):
        assert continued_entry(kept, 5, True, 3, Path("x.json")) is kept
    assert "already accounts round 3" in caplog.text
