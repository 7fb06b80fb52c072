"""Compressed adapter messages: codecs, validation, error feedback, both directions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from flower_llm import compression, updates, wire
from flower_llm.compression import (
    NF4_LEVELS,
    RELATIVE_ERROR,
    WIRE_FORMAT,
    AdapterState,
    Header,
    WireFormatError,
    compress_with_feedback,
    decode,
    encode,
    encoded_bytes,
)
from flower_llm.site_state import SiteStateStore
from strategies.fedavg import WeightedFedAvg
from tests.rebuild import rebuilt_initial


@pytest.fixture(autouse=True)
def server_task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


SHAPES = {"m.lora_A.weight": (4, 100), "m.lora_B.weight": (50, 4), "odd": (3, 7)}


def make_state(rng: np.random.Generator, scale: float = 1e-3) -> dict[str, np.ndarray]:
    return {k: (rng.standard_t(3, size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def header(codec: str, keys: tuple[str, ...] = tuple(SHAPES), block: int = 64) -> Header:
    return Header(codec, block, "update", keys, 3, "abc")


def block_absmax(values: np.ndarray, block: int) -> np.ndarray:
    """Per value, the absmax of its block (blocks within one tensor, C order)."""
    flat = np.abs(values.ravel())
    out = np.empty_like(flat)
    for start in range(0, flat.size, block):
        out[start : start + block] = flat[start : start + block].max()
    return out.reshape(values.shape)


# --------------------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["float32", "bfloat16", "int8", "nf4"])
@pytest.mark.parametrize("block", [2, 17, 64, 256])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_format_round_trips_within_its_stated_error(codec: str, block: int, seed: int) -> None:
    # Prepare: heavy-tailed values, a zero block, shapes that are not multiples of the block
    state = make_state(np.random.default_rng(seed))
    state["m.lora_B.weight"][:10] = 0.0

    # Execute
    decoded = decode(encode(state, header(codec, block=block)), header(codec, block=block))

    # Assert: every value within the format's bound; zeros stay exactly zero
    for key, value in state.items():
        assert decoded[key].shape == value.shape and decoded[key].dtype == np.float32
        error = np.abs(decoded[key] - value)
        if codec == "bfloat16":
            bound = RELATIVE_ERROR[codec] * np.abs(value)
        else:
            bound = RELATIVE_ERROR[codec] * block_absmax(value, block)
        assert (error <= bound * (1 + 1e-6) + 1e-12).all(), key
    assert (decoded["m.lora_B.weight"][:10] == 0).all()


def test_bfloat16_rounds_to_nearest_even_as_torch_does() -> None:
    import torch

    values = np.random.default_rng(3).normal(size=4096).astype(np.float32)
    values[:4] = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 0.0]  # exact ties
    decoded = decode(encode({"x": values}, header("bfloat16", ("x",))), header("bfloat16", ("x",)))
    expected = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(decoded["x"], expected)


def test_nf4_codes_are_the_nearest_normalfloat_level() -> None:
    # Prepare: one block whose absmax is 1, so the values are the normalised values
    values = np.linspace(-1, 1, 64, dtype=np.float32)
    h = header("nf4", ("x",))

    # Execute
    decoded = decode(encode({"x": values}, h), h)["x"]

    # Assert: each decoded value is the level closest to its input
    nearest = NF4_LEVELS[np.argmin(np.abs(values[:, None] - NF4_LEVELS[None, :]), axis=1)]
    np.testing.assert_allclose(decoded, nearest, atol=1e-7)


def nearest_level_reference(normalised: np.ndarray) -> np.ndarray:
    """Brute force in float64: the index of the nearest NF4 level, ties to the lower one."""
    distance = np.abs(normalised.astype(np.float64)[:, None] - NF4_LEVELS.astype(np.float64))
    return np.argmin(distance, axis=1)  # argmin takes the first (lower) of equal distances


def test_nf4_codes_equal_a_brute_force_nearest_level_search_at_every_midpoint() -> None:
    # Prepare: around every midpoint of adjacent levels (float64, exact), the float32
    # values just below, at and just above it; then random values and the levels; one
    # block whose absmax is exactly 1 so the encoder sees these values unscaled
    levels = NF4_LEVELS.astype(np.float64)
    mids = (levels[1:] + levels[:-1]) / 2
    near = []
    for m in mids:
        x = np.float32(m)
        for _ in range(3):
            x = np.nextafter(x, np.float32(-2))
        for _ in range(7):
            near.append(x)
            x = np.nextafter(x, np.float32(2))
    rng = np.random.default_rng(5)
    values = np.concatenate([near, NF4_LEVELS, rng.uniform(-1, 1, 5000), [1.0, -1.0, 0.0]]).astype(
        np.float32
    )
    if values.size % 2:
        values = np.append(values, np.float32(0.5))
    h = header("nf4", ("x",), block=values.size)

    # Execute
    record = encode({"x": values}, h)
    packed = record["codes"].numpy()
    codes = np.empty(packed.size * 2, np.int64)
    codes[0::2], codes[1::2] = packed >> 4, packed & 0x0F

    # Assert: the codes are the brute-force nearest levels, value by value
    np.testing.assert_array_equal(codes[: values.size], nearest_level_reference(values))


@pytest.mark.parametrize("codec", ["bfloat16", "int8", "nf4", "float32"])
def test_bytes_on_the_wire_match_the_formula(codec: str) -> None:
    # Prepare
    state = make_state(np.random.default_rng(4))
    sizes = [v.size for v in state.values()]
    record = encode(state, header(codec))

    # Execute
    measured = wire.num_bytes(record)

    # Assert: codes + scales as the formula says, plus the shapes (3 ranks, 6 dims, int64)
    # and one 128-byte .npy header per array
    arrays = 4 if codec in ("int8", "nf4") else 3
    assert measured == encoded_bytes(sizes, codec, 64) + 8 * (3 + 6) + 128 * arrays
    total = sum(sizes)  # 400 + 200 + 21 values; blocks 7 + 4 + 1
    expected_payload = {
        "float32": 4 * total,
        "bfloat16": 2 * total,
        "int8": total + 4 * 12,
        "nf4": math.ceil(total / 2) + 4 * 12,
    }[codec]
    assert encoded_bytes(sizes, codec, 64) == expected_payload


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def corrupt(record: ArrayRecord, name: str, value: np.ndarray) -> ArrayRecord:
    arrays = dict(record.items())
    arrays[name] = Array(value)
    return ArrayRecord(arrays)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncated-codes", "truncated"),
        ("nan-scale", "scale"),
        ("negative-scale", "scale"),
        ("short-scales", "scales are"),
        ("minus-128", "-128"),
        ("missing-scales", "arrays"),
        ("shape-mismatch", "shapes"),
    ],
)
def test_a_damaged_message_is_refused_with_a_reason(damage: str, reason: str) -> None:
    state = make_state(np.random.default_rng(5))
    h = header("int8")
    record = encode(state, h)
    codes = record["codes"].numpy()
    scales = record["scales"].numpy()
    if damage == "truncated-codes":
        record = corrupt(record, "codes", codes[:-5])
    elif damage == "nan-scale":
        record = corrupt(record, "scales", np.where(np.arange(scales.size) == 2, np.nan, scales))
    elif damage == "negative-scale":
        record = corrupt(record, "scales", -scales)
    elif damage == "short-scales":
        record = corrupt(record, "scales", scales[:-1])
    elif damage == "minus-128":
        record = corrupt(
            record, "codes", np.where(np.arange(codes.size) == 0, -128, codes).astype(np.int8)
        )
    elif damage == "missing-scales":
        record = ArrayRecord({k: v for k, v in record.items() if k != "scales"})
    elif damage == "shape-mismatch":
        record = corrupt(record, "shape-ranks", np.array([2, 2], np.int64))
    with pytest.raises(WireFormatError, match=reason):
        decode(record, h)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("format-version", 3, "version"),
        ("format", "other", "format"),
        ("codec", "int4", "codec"),
        ("block-size", 0, "block size"),
        ("keys", ["a", "a"], "twice"),
    ],
)
def test_a_bad_header_is_refused(field: str, value: object, reason: str) -> None:
    record = header("nf4").to_record()
    record[field] = value  # type: ignore[assignment]
    with pytest.raises(WireFormatError, match=reason):
        Header.from_record(record)


def test_nf4_and_bfloat16_codes_are_checked() -> None:
    state = {"x": np.ones(5, np.float32)}
    h = header("nf4", ("x",))
    record = encode(state, h)
    codes = record["codes"].numpy().copy()
    codes[-1] |= 0x01  # the padding nibble of 5 values
    with pytest.raises(WireFormatError, match="padding"):
        decode(corrupt(record, "codes", codes), h)
    hb = header("bfloat16", ("x",))
    record = encode(state, hb)
    with pytest.raises(WireFormatError, match="NaN or Inf"):
        decode(corrupt(record, "codes", np.full(5, 0x7F80, np.uint16)), hb)


# --------------------------------------------------------------------------------------
# Error feedback
# --------------------------------------------------------------------------------------


def drift(codec: str, feedback: bool, rounds: int = 200) -> tuple[float, float]:
    """max |sum of decoded - sum of true updates| over ``rounds``, and one update's absmax.

    Each update has one large value per block and small ones with a steady drift: nf4 and
    int8 round the small ones to (almost) nothing, round after round.
    """
    rng = np.random.default_rng(6)
    keys = ("x",)
    h = header(codec, keys)
    residual = None
    true_sum = np.zeros(256, np.float64)
    sent_sum = np.zeros(256, np.float64)
    for _ in range(rounds):
        update = rng.normal(0.002, 0.001, 256)
        update[::64] = 1.0
        sent = compress_with_feedback({"x": update}, residual, h, feedback=feedback)
        residual = sent.residual
        true_sum += update
        sent_sum += sent.decoded["x"]
    return float(np.max(np.abs(sent_sum - true_sum))), 1.0


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_error_feedback_keeps_the_sum_of_sent_updates_on_the_true_sum(codec: str) -> None:
    with_feedback, absmax = drift(codec, feedback=True)
    without, _ = drift(codec, feedback=False)
    # The gap is the last residual: at most one quantisation error of a block (+ rounding).
    assert with_feedback <= RELATIVE_ERROR[codec] * absmax * 1.01 + 1e-4
    # Without feedback the small drift is rounded away every round and the gap grows.
    assert without > 10 * with_feedback and without > 0.2


def test_a_client_fixed_update_stays_within_the_clip_norm_after_decoding() -> None:
    rng = np.random.default_rng(7)
    residual = None
    h = header("nf4", ("x",))
    for _ in range(20):
        update = {"x": rng.normal(0, 1, 1000)}
        sent = compress_with_feedback(update, residual, h, feedback=True, clip_norm=0.5)
        residual = sent.residual
        norm = math.sqrt(float(np.sum(np.square(sent.decoded["x"], dtype=np.float64))))
        assert norm <= 0.5
        assert norm > 0.4  # clipped to the bound, not far below it


# --------------------------------------------------------------------------------------
# Both directions, through the strategy and a site
# --------------------------------------------------------------------------------------


def train_reply(
    instruction: Message, node_state: RecordDict, shift: float, codec: str = "int8"
) -> Message:
    """A site: reconstruct the global adapter, 'train' (add ``shift``), send the update."""
    global_state, received = updates.receive(node_state, instruction.content)
    assert received is not None
    local = {k: v + np.float32(shift) for k, v in global_state.items()}
    settings = updates.UplinkSettings(codec, 64, True, run_id=1, resume=False)
    arrays, head = updates.send_update(node_state, None, settings, local, global_state, received, 1)
    content = RecordDict(
        {
            wire.ARRAYS: arrays,
            WIRE_FORMAT: head,
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10}),
        }
    )
    return Message(content, reply_to=instruction)


class Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def test_a_corrupted_compressed_reply_is_dropped_with_a_reason() -> None:
    # Prepare: three sites answer a round's int8 instruction; node 3's codes are cut short
    strategy = WeightedFedAvg(wire_dtype="int8", min_available_clients=3, update_bound=None)
    initial = wire.to_array_record(make_state(np.random.default_rng(8), scale=0.1))
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    states = {m.metadata.dst_node_id: RecordDict() for m in messages}
    replies = [train_reply(m, states[m.metadata.dst_node_id], 0.01) for m in messages]
    bad = replies[2]
    codes = bad.content.array_records[wire.ARRAYS]["codes"].numpy()
    bad.content.array_records[wire.ARRAYS]["codes"] = Array(codes[:-3])

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: dropped with the decoder's reason; the other two are averaged
    assert "truncated" in strategy.report.dropped[3]
    assert strategy.report.accepted == [1, 2]
    assert arrays is not None
    start = wire.from_array_record(initial)
    new = wire.from_array_record(arrays)
    for key in start:
        np.testing.assert_allclose(new[key] - start[key], 0.01, atol=1e-3)
    # Bytes per site: each got the whole adapter (first contact) and sent int8 codes
    sent, received = strategy.report.bytes_by_node[1]
    assert sent == wire.num_bytes(messages[0].content.array_records[wire.ARRAYS])
    assert received == wire.num_bytes(replies[0].content.array_records[wire.ARRAYS])
    assert received < sent / 2  # 621 values: .npy headers are a large part here


def test_the_downlink_sends_each_site_what_it_needs_and_sites_follow_it() -> None:
    # Prepare: round 1 to every site, then round 2 to sites 1 and 2 only, round 3 to all
    strategy = WeightedFedAvg(wire_dtype="nf4", min_available_clients=3, min_train_clients=1)
    strategy.update_bound = None
    arrays = wire.to_array_record(make_state(np.random.default_rng(9), scale=0.1))
    states = {n: RecordDict() for n in (1, 2, 3)}
    kinds: dict[int, dict[int, str]] = {}
    for server_round, cohort in ((1, [1, 2, 3]), (2, [1, 2]), (3, [1, 2, 3])):
        strategy.train_sampler.sample = lambda nodes, rng, c=cohort: list(c)  # type: ignore[method-assign]
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid()))  # type: ignore[arg-type]
        kinds[server_round] = {
            m.metadata.dst_node_id: str(m.content.config_records[WIRE_FORMAT]["content"])
            for m in messages
        }
        replies = [train_reply(m, states[m.metadata.dst_node_id], 0.02, "nf4") for m in messages]
        new, _ = strategy.aggregate_train(server_round, replies)
        assert new is not None and not strategy.report.dropped
        arrays = new

    # Assert: whole adapter on first contact and after a missed round, updates otherwise
    assert kinds[1] == {1: "adapter", 2: "adapter", 3: "adapter"}
    assert kinds[2] == {1: "update", 2: "update"}
    assert kinds[3] == {1: "update", 2: "update", 3: "adapter"}
    # Every site reconstructs exactly the server's global adapter (same digest)
    assert strategy.downlink is not None
    assert compression.digest(wire.from_array_record(arrays)) == strategy.downlink.held.digest


def test_a_site_refuses_an_update_of_a_version_it_does_not_hold() -> None:
    downlink = updates.Downlink("int8", 64, True)
    downlink.start(make_state(np.random.default_rng(10)), 0)
    downlink.commit(make_state(np.random.default_rng(11)), list(SHAPES))
    record, head = downlink.update  # type: ignore[misc]
    content = RecordDict({wire.ARRAYS: record, WIRE_FORMAT: head.to_record()})
    with pytest.raises(WireFormatError, match="holds none"):
        updates.receive(RecordDict(), content)


def test_a_resumed_downlink_sends_updates_and_a_site_that_lost_its_version_gets_the_adapter(
    tmp_path: Path,
) -> None:
    import json

    # Prepare: the server sends version 0 to sites 1 and 2 and commits version 1; site 1
    # applies it, site 2 never receives it (it holds 0); both keep what they hold in a store
    rng = np.random.default_rng(12)
    server = updates.Downlink("int8", 64, True)
    server.start(make_state(rng), 0)
    stores = {n: SiteStateStore(tmp_path, "run", f"node-{n}") for n in (1, 2)}
    sessions = {n: RecordDict() for n in (1, 2)}

    def deliver(node: int, downlink: updates.Downlink, session: RecordDict) -> AdapterState:
        payload, head = downlink.payload(node)
        content = RecordDict({wire.ARRAYS: payload, WIRE_FORMAT: head})
        state, received = updates.receive(session, content, stores[node])
        assert received is not None
        downlink.note(node, updates.holds_record(session, received))  # its reply
        return state

    for node in (1, 2):
        deliver(node, server, sessions[node])
    server.commit(make_state(rng), list(SHAPES))
    deliver(1, server, sessions[1])

    # Execute: a checkpoint (through JSON, as written) continued by a new server
    state = json.loads(json.dumps(server.state_dict()))
    resumed = updates.Downlink("int8", 64, True)
    resumed.load_state(state, server.state_arrays())
    resumed.start(server.global_state, 5)  # type: ignore[arg-type]
    kinds = {n: str(resumed.payload(n)[1]["content"]) for n in (1, 2)}
    # Site 1 lost its store (a new machine); site 2 holds version 0 in its store only
    (stores[1].directory / updates.HELD_GLOBAL_FILE).unlink()
    payload, head = resumed.payload(1)
    with pytest.raises(WireFormatError, match="holds none"):
        updates.receive(RecordDict(), RecordDict({wire.ARRAYS: payload, WIRE_FORMAT: head}))
    resumed.note(1, None)  # its error reply
    site2 = deliver(2, resumed, RecordDict())

    # Assert: the checkpoint's versions, updates for the sites that hold them, and the
    # whole adapter for the site that refused
    assert resumed.held == server.held and resumed.version == 1
    assert kinds == {1: "same", 2: "update"}
    assert compression.digest(site2) == server.held.digest
    assert resumed.payload(1)[1]["content"] == "adapter"
    assert resumed.residual is not None
    for key, value in server.residual.items():  # type: ignore[union-attr]
        np.testing.assert_array_equal(resumed.residual[key], value)


def test_the_site_residual_survives_in_its_store_and_a_fresh_run_ignores_it(tmp_path: Path) -> None:
    store = SiteStateStore(tmp_path, "run", "site")
    residual = {"x": np.arange(4, dtype=np.float32)}
    run_id = 12643087393756660020  # Flower run ids use all 64 bits
    same_run = updates.UplinkSettings("int8", 64, True, run_id=run_id, resume=False)
    for server_round in (1, 2, 3):
        updates.save_residual(RecordDict(), store, same_run, server_round, residual)
    # Only the last two rounds are kept; round 3 resumes from round 2's residual
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "uplink-residual-000002.npz",
        "uplink-residual-000003.npz",
    ]
    resumed = updates.UplinkSettings("int8", 64, True, run_id=run_id + 1, resume=True)
    loaded = updates.load_residual(RecordDict(), store, resumed, 3)
    assert loaded is not None
    np.testing.assert_array_equal(loaded["x"], residual["x"])
    fresh = updates.UplinkSettings("int8", 64, True, run_id=run_id + 1, resume=False)
    assert updates.load_residual(RecordDict(), store, same_run, 3) is not None
    assert updates.load_residual(RecordDict(), store, fresh, 3) is None


def test_bad_settings_are_refused() -> None:
    from flower_llm.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError, match="secagg"):
        parse_run_config(
            {
                "fed.wire-dtype": "nf4",
                "fed.aggregation": "secagg+",
                "output.local-only-baseline": False,
            }
        )
    with pytest.raises(ConfigError, match=r"fed\.wire-block-size"):
        parse_run_config({"fed.wire-block-size": 1})
    with pytest.raises(ConfigError, match="float16"):
        parse_run_config(
            {
                "fed.wire-dtype": "float16",
                "privacy.mode": "client-fixed",
                "output.local-only-baseline": False,
            }
        )
    assert (
        parse_run_config(
            {
                "fed.wire-dtype": "nf4",
                "privacy.mode": "client-fixed",
                "output.local-only-baseline": False,
            }
        ).fed.wire_dtype
        == "nf4"
    )


# --------------------------------------------------------------------------------------
# A resumed run with error feedback equals an uninterrupted one
# --------------------------------------------------------------------------------------


EVAL_METRICS = {
    wire.NUM_EXAMPLES: 2,
    wire.EVAL_LOSS: 1.0,
    wire.EVAL_PERPLEXITY: 2.7,
    wire.EVAL_TOKEN_ACCURACY: 0.5,
    wire.EVAL_TOKENS: 10,
}
"""A site's evaluation reply metrics (the values do not matter here)."""


class CompressedSites:
    """Six sites that follow the compressed protocol with real records: each holds its
    global adapter in its node state (rebuilding the initial one when told to), 'trains'
    ``global + delta(node, round)`` and sends ``Q(u + e)``, its residual in its node state
    and its site-state store."""

    def __init__(self, store_root: Path, run_id: int, resume: bool, codec: str) -> None:
        self.nodes = [11, 22, 33, 44, 55, 66]
        self.node_states = {n: RecordDict() for n in self.nodes}  # a new Flower run: empty
        self.store_root = store_root
        self.settings = updates.UplinkSettings(codec, 64, True, run_id, resume)
        self.initial = rebuilt_initial()
        self.cohorts: dict[int, list[int]] = {}
        self.kinds: dict[int, dict[int, list[str]]] = {}
        """round -> node -> what each message to it carried (adapter, update, same)."""

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def store(self, node: int) -> SiteStateStore:
        return SiteStateStore(self.store_root, "run", f"node-{node}")

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            # A site answers in the wire layout it received (fed.wire-layout).
            instruction, packed = wire.unpack(msg.content)
            config = instruction.config_records[wire.CONFIG]
            server_round = int(config[wire.SERVER_ROUND])  # type: ignore[arg-type]
            global_state, received = updates.receive(
                self.node_states[node], instruction, self.store(node), self.initial
            )
            assert received is not None
            self.kinds.setdefault(server_round, {}).setdefault(node, []).append(
                str(instruction.config_records[WIRE_FORMAT]["content"])
            )
            if msg.metadata.message_type == MessageType.TRAIN:
                self.cohorts.setdefault(server_round, []).append(node)
                rng = np.random.default_rng([node, server_round])
                local = {
                    k: v + rng.normal(1e-4, 1e-4, v.shape).astype(np.float32)
                    for k, v in global_state.items()
                }
                arrays, head = updates.send_update(
                    self.node_states[node],
                    self.store(node),
                    self.settings,
                    local,
                    global_state,
                    received,
                    server_round,
                )
                metrics = {wire.NUM_EXAMPLES: node, wire.TRAIN_LOSS: 1.0}
                content = RecordDict(
                    {wire.ARRAYS: arrays, WIRE_FORMAT: head, wire.METRICS: MetricRecord(metrics)}
                )
            else:
                metrics = EVAL_METRICS
                content = RecordDict(
                    {
                        wire.METRICS: MetricRecord(metrics),  # type: ignore[arg-type]
                        WIRE_FORMAT: updates.holds_record(self.node_states[node], received),
                    }
                )
            replies.append(Message(wire.pack(content) if packed else content, reply_to=msg))
        return replies


def engine_context() -> object:
    from flwr.app import Context

    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_a_resumed_run_with_error_feedback_ends_with_the_uninterrupted_adapter(
    tmp_path: Path, codec: str
) -> None:
    import json

    from safetensors.numpy import load_file

    from flower_llm.config import parse_run_config
    from server_apps.fedavg import run

    # Prepare: half the sites train and half evaluate each round, so some hold the last
    # version, some the one before (they get the update), some older ones (whole adapters)
    job = {
        "fed.fraction-train": 0.5,
        "fed.fraction-evaluate": 0.5,
        "fed.min-available-clients": 6,
        "fed.wire-dtype": codec,
        "train.lr-schedule": "constant",
        "output.local-only-baseline": False,
        "output.dir": str(tmp_path / "out"),
    }
    full = CompressedSites(tmp_path / "full-sites", run_id=1, resume=False, codec=codec)
    run(
        full,
        engine_context(),
        parse_run_config({**job, "fed.num-rounds": 4, "output.run-name": "full"}),
    )  # type: ignore[arg-type]

    # Execute: 2 rounds, then a new run (empty node state; each site's store keeps the
    # global adapter it holds) that resumes for rounds 3-4; the sites of round 3 had
    # trained it before the interruption: their residual of the lost round 3 must not be
    # used.
    sites = tmp_path / "resumed-sites"
    first = {**job, "fed.num-rounds": 2, "output.run-name": "resumed"}
    run(CompressedSites(sites, 1, False, codec), engine_context(), parse_run_config(first))  # type: ignore[arg-type]
    garbage = {"x": np.full(3, 7.0, np.float32)}
    for node in full.cohorts[3]:
        store = SiteStateStore(sites, "run", f"node-{node}")
        updates.save_residual(
            RecordDict(), store, updates.UplinkSettings(codec, 64, True, 1, False), 3, garbage
        )
    again = {**first, "fed.num-rounds": 4, "output.resume": True}
    resumed = CompressedSites(sites, 2, True, codec)
    run(resumed, engine_context(), parse_run_config(again))  # type: ignore[arg-type]

    # Assert: the same final adapter, bit for bit
    out = tmp_path / "out"
    a = load_file(str(out / "full" / "final" / "adapter_model.safetensors"))
    b = load_file(str(out / "resumed" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # ... after the same messages: updates again after the resume, not whole adapters,
    # so the same bytes both ways, per site too
    assert resumed.kinds == {r: full.kinds[r] for r in (3, 4)}
    sent_kinds = {k for per_node in resumed.kinds.values() for v in per_node.values() for k in v}
    assert {"update", "same", "adapter"} <= sent_kinds
    # ... the first run's first contacts were `initial` instructions (the sites rebuilt
    # the seeded adapter), none after the resume (the global adapter had moved on)
    assert {k for v in full.kinds[0].values() for k in v} == {"initial"}
    assert "initial" not in sent_kinds
    summary = json.loads((out / "full" / "summary.json").read_text())
    again_summary = json.loads((out / "resumed" / "summary.json").read_text())
    for key in ("bytes-down", "bytes-down-eval", "bytes-up", "bytes-by-site"):
        assert again_summary[key] == summary[key], key
    # ... and the runs moved the adapter (residuals mattered: the server kept one)
    assert summary["rounds-failed"] == 0 and summary["rounds"] == 4
    assert summary["mb-up"] > 0 and set(summary["bytes-by-site"]) == {
        "11",
        "22",
        "33",
        "44",
        "55",
        "66",
    }
    rows = [json.loads(line) for line in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(not row["dropped"] for row in rows)
    assert sum(v["bytes-up"] for v in summary["bytes-by-site"].values()) == summary["bytes-up"]


class EvaluatingSites:
    """Three sites that answer evaluation messages; records the bytes of each message as
    it arrived (the adapter, or an ``initial`` instruction's records)."""

    def __init__(self) -> None:
        self.sent: dict[int, list[int]] = {}

    def get_node_ids(self) -> list[int]:
        return [7, 8, 9]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.EVALUATE
            node = msg.metadata.dst_node_id
            self.sent.setdefault(node, []).append(wire.payload_bytes(msg.content))
            content = RecordDict({wire.METRICS: MetricRecord(EVAL_METRICS)})  # type: ignore[arg-type]
            if msg.content.config_records[wire.CONFIG].get(wire.SITE_LABEL):
                content[wire.SITE] = ConfigRecord({"label": f"site {node - 6}"})
            replies.append(Message(content, reply_to=msg))
        return replies


def test_secagg_runs_count_the_bytes_sent_for_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from flower_llm.config import parse_run_config
    from server_apps.fedavg import run
    from strategies.fedavg import RoundReport
    from strategies.rounds import TrainRound
    from strategies.secagg import SecAggRounds

    # Prepare: the SecAgg+ protocol itself replaced by a round that sends 100 bytes to and
    # receives 40 from each site (its own traffic is measured by its CountingGrid) and
    # moves the adapter
    def protocol(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        moved = {k: v + 0.01 for k, v in wire.from_array_record(arrays).items()}
        arrays = wire.to_array_record(moved)
        nodes = grid.get_node_ids()
        report = RoundReport(
            sampled=nodes,
            accepted=nodes,
            updated=True,
            bytes_down=100 * len(nodes),
            bytes_up=40 * len(nodes),
            bytes_by_node={n: [100, 40] for n in nodes},
        )
        return TrainRound(arrays, MetricRecord({wire.TRAIN_LOSS: 1.0}), report, {})

    monkeypatch.setattr(SecAggRounds, "_train_round", protocol)
    sites = EvaluatingSites()
    cfg = {
        "fed.aggregation": "secagg+",
        "fed.max-weight": 1000.0,
        "fed.num-rounds": 2,
        "fed.min-available-clients": 3,
        "output.local-only-baseline": False,
        "output.dir": str(tmp_path),
        "output.run-name": "secagg",
    }

    # Execute
    run(sites, engine_context(), parse_run_config(cfg))  # type: ignore[arg-type]

    # Assert: rounds 0, 1 and 2 were evaluated on every site (round 0's untrained adapter
    # as an ``initial`` instruction, of a few hundred bytes); every byte sent for it is
    # counted, in the totals and per site, beside the protocol's own
    summary = json.loads((tmp_path / "secagg" / "summary.json").read_text())
    initial, adapter, _ = sites.sent[7]
    assert 0 < initial < 400 and adapter > 1000
    assert sites.sent == {n: [initial, adapter, adapter] for n in (7, 8, 9)}
    per_site = initial + 2 * adapter
    assert summary["bytes-down-eval"] == 3 * per_site
    assert summary["bytes-down"] == 2 * 300 and summary["bytes-up"] == 2 * 120
    assert summary["bytes-by-site"] == {
        str(n): {"bytes-down": per_site + 200, "bytes-up": 80} for n in (7, 8, 9)
    }
    assert summary["mb-down"] == pytest.approx((3 * per_site + 600) / 1e6, abs=0.01)
    # ... and the sites are named by the labels their evaluation replies gave
    assert summary["site-labels"] == {"7": "site 1", "8": "site 2", "9": "site 3"}


@pytest.mark.parametrize("codec", ["bfloat16", "int8", "nf4"])
def test_the_wire_table_counts_the_bytes_an_encoded_update_has(codec: str) -> None:
    from benchmarks.wire_bytes import compressed_record_bytes

    shapes = {"a.lora_A.weight": (16, 1000), "a.lora_B.weight": (3000, 16), "b": (7,)}
    state = {k: np.ones(s, np.float32) for k, s in shapes.items()}
    assert compressed_record_bytes(shapes, codec) == wire.num_bytes(
        encode(state, header(codec, tuple(shapes)))
    )
