"""The packed wire layout (``fed.wire-layout = packed``): round trips, hostile headers,
the strategy and the ClientApp speaking it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from flower_llm import compression, wire
from flower_llm.compression import WIRE_FORMAT, Header
from flower_llm.config import parse_run_config
from flower_llm.wire import PackedLayoutError
from strategies.fedavg import WeightedFedAvg


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


# 14 modules x (A, B): the tiny model's 28 arrays.
SHAPES = {
    f"m{i}.lora_{ab}.weight": (4, 24) if ab == "A" else (24, 4) for i in range(14) for ab in "AB"
}


def make_state(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def content_of(record: ArrayRecord, **extra: Any) -> RecordDict:
    return RecordDict({wire.ARRAYS: record, wire.CONFIG: ConfigRecord({"x": 1}), **extra})


def same_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a) == list(b)
    for key in a:
        left, right = a[key].numpy(), b[key].numpy()
        assert left.dtype == right.dtype and left.shape == right.shape, key
        np.testing.assert_array_equal(left, right)


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_a_whole_adapter_round_trips_bit_for_bit(wire_dtype: str) -> None:
    # Prepare
    record = wire.to_array_record(make_state(1), wire_dtype)
    local_only = wire.to_array_record(make_state(2), wire_dtype)
    content = content_of(record, **{wire.LOCAL_ONLY_ARRAYS: local_only})

    # Execute
    packed = wire.pack(content)
    unpacked, was_packed = wire.unpack(packed)

    # Assert: one array a record, the header names both; everything comes back as sent
    assert was_packed and wire.is_packed(packed)
    assert list(packed.array_records[wire.ARRAYS]) == [wire.PACKED]
    assert packed.config_records[wire.LAYOUT]["records"] == [wire.ARRAYS, wire.LOCAL_ONLY_ARRAYS]
    same_arrays(unpacked.array_records[wire.ARRAYS], record)
    same_arrays(unpacked.array_records[wire.LOCAL_ONLY_ARRAYS], local_only)
    assert dict(unpacked.config_records[wire.CONFIG]) == {"x": 1}
    assert wire.LAYOUT not in unpacked
    # Content that is not packed passes through untouched
    assert wire.unpack(content) == (content, False)


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
@pytest.mark.parametrize("packed", [True, False])
def test_unpack_views_reads_the_adapter_in_place(wire_dtype: str, packed: bool) -> None:
    # Prepare: a reply with the adapter and a second record, packed or not
    record = wire.to_array_record(make_state(1), wire_dtype)
    local_only = wire.to_array_record(make_state(2), wire_dtype)
    content = content_of(record, **{wire.LOCAL_ONLY_ARRAYS: local_only})
    sent = wire.pack(content) if packed else content

    # Execute
    rest, views = wire.unpack_views(sent)

    # Assert: the adapter's values as sent, read-only, in the bytes of the message itself
    # (packed: all in its one payload, nothing copied); the rest unpacked as unpack does
    assert views is not None and list(views) == list(record)
    for key, view in views.items():
        np.testing.assert_array_equal(view, record[key].numpy())
        assert view.dtype == np.dtype(wire_dtype) and not view.flags.writeable
    if packed:
        payload = wire.array_view(sent.array_records[wire.ARRAYS][wire.PACKED])
        assert all(np.shares_memory(v, payload) for v in views.values())
    assert wire.ARRAYS not in rest and wire.LAYOUT not in rest
    same_arrays(rest.array_records[wire.LOCAL_ONLY_ARRAYS], local_only)
    assert dict(rest.config_records[wire.CONFIG]) == {"x": 1}
    # ... no adapter record: None; a non-float adapter: refused
    assert wire.unpack_views(content_of(record), "other") == (content_of(record), None)
    ints = ArrayRecord({"m.lora_A.weight": Array(np.arange(6, dtype=np.int64))})
    with pytest.raises(ValueError, match="expected a float type"):
        wire.unpack_views(wire.pack(content_of(ints)) if packed else content_of(ints))


@pytest.mark.parametrize("codec", ["float32", "bfloat16", "int8", "nf4"])
def test_compressed_codes_and_scales_round_trip(codec: str) -> None:
    # Prepare: an odd total so nf4's padding nibble and misaligned offsets are exercised
    state = {**make_state(3), "odd": np.arange(21, dtype=np.float32).reshape(3, 7) / 50}
    header = Header(codec, 64, "update", tuple(state), 1, "abc")
    record = compression.encode(state, header)
    content = content_of(record, **{WIRE_FORMAT: header.to_record()})

    # Execute
    unpacked, _ = wire.unpack(wire.pack(content))

    # Assert: the same codes, scales and shapes; decoding gives what the arrays layout gives
    same_arrays(unpacked.array_records[wire.ARRAYS], record)
    decoded = compression.decode(unpacked.array_records[wire.ARRAYS], header)
    reference = compression.decode(record, header)
    for key in state:
        np.testing.assert_array_equal(decoded[key], reference[key])


def test_a_message_without_arrays_still_says_it_is_packed() -> None:
    # A compressed "same" instruction (an empty ArrayRecord): the site must learn the
    # layout to reply in, so the header goes along with no records
    content = content_of(ArrayRecord())
    packed = wire.pack(content)
    assert wire.is_packed(packed)
    assert "records" not in packed.config_records[wire.LAYOUT]  # an empty list: left out
    assert packed.config_records[wire.LAYOUT].count_bytes() > 0
    assert len(packed.array_records[wire.ARRAYS]) == 0
    unpacked, was_packed = wire.unpack(packed)
    assert was_packed and list(unpacked) == list(content)


def test_a_packed_message_is_a_handful_of_flower_objects() -> None:
    # Prepare: the tiny model's 28 arrays
    content = content_of(wire.to_array_record(make_state(4)))

    # Execute: Flower stores and moves each of these objects with its own request
    arrays_objects = len(get_all_nested_objects(content))
    packed_objects = len(get_all_nested_objects(wire.pack(content)))

    # Assert: 28 arrays + 28 chunks + records against one array, one chunk, the records
    assert arrays_objects >= 2 * len(SHAPES)
    assert packed_objects <= 6


def test_bytes_count_the_packed_payload_and_its_header() -> None:
    content = content_of(wire.to_array_record(make_state(5)))
    packed = wire.pack(content)
    values = sum(v.nbytes for v in make_state(5).values())
    header = packed.config_records[wire.LAYOUT].count_bytes()

    assert header > 0
    assert wire.payload_bytes(packed) == wire.num_bytes(packed.array_records[wire.ARRAYS]) + header
    assert wire.message_bytes(packed) == wire.payload_bytes(packed)
    assert values < wire.payload_bytes(packed) < values + header + 1024
    assert wire.payload_bytes(content) == wire.num_bytes(content.array_records[wire.ARRAYS])


# --------------------------------------------------------------------------------------
# Hostile headers
# --------------------------------------------------------------------------------------


def packed_content() -> RecordDict:
    return wire.pack(content_of(wire.to_array_record(make_state(6))))


def with_header(content: RecordDict, **changes: Any) -> RecordDict:
    header = dict(content.config_records[wire.LAYOUT])
    for key, value in changes.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    out = copy.copy(content)
    out[wire.LAYOUT] = ConfigRecord(header)
    return out


def first(field: str) -> Any:
    return list(packed_content().config_records[wire.LAYOUT][f"arrays:{field}"])  # type: ignore[arg-type]


HOSTILE = {
    "format": ({"format": "someone-else"}, "format 'someone-else'"),
    "version": ({"format-version": 2}, "format version 2"),
    "no records": ({"records": None}, "'arrays' is not described"),
    "records not a list": ({"records": "arrays"}, "'records' is not a list"),
    "record twice": ({"records": ["arrays", "arrays"]}, "names a record twice"),
    "missing record": ({"records": ["arrays", "ghost"]}, "lacks"),
    "key twice": ({"arrays:keys": [first("keys")[0]] * len(SHAPES)}, "names an array twice"),
    "unknown dtype": (
        {"arrays:dtypes": ["object", *first("dtypes")[1:]]},
        "is not a list of",
    ),
    "bigger dtype": ({"arrays:dtypes": ["int64", *first("dtypes")[1:]]}, "at offset"),
    "short lists": ({"arrays:ranks": first("ranks")[:-1]}, "28 keys, 28 dtypes, 27 ranks"),
    "ranks vs dims": ({"arrays:dims": first("dims")[:-1]}, "do not match"),
    "negative dim": ({"arrays:dims": [-4, *first("dims")[1:]]}, "negative"),
    "offset out of place": ({"arrays:offsets": [0, 8, *first("offsets")[2:]]}, "at offset 8"),
    "offset beyond": ({"arrays:offsets": [*first("offsets")[:-1], 10**9]}, "expected"),
    "bytes lie": ({"arrays:bytes": 10**6}, "header says 1000000"),
    "bytes not int": ({"arrays:bytes": "a lot"}, "is not a byte count"),
    "dims lie": ({"arrays:dims": [5, *first("dims")[1:]]}, "expected"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_lying_header_is_refused_with_a_reason(name: str) -> None:
    changes, reason = HOSTILE[name]
    content = with_header(packed_content(), **changes)
    with pytest.raises(PackedLayoutError, match=reason):
        wire.unpack(content)
    with pytest.raises(PackedLayoutError, match=reason):
        wire.unpack_views(content)


def test_a_header_of_booleans_is_not_taken_for_the_cached_layout_of_ones() -> None:
    # Prepare: a valid header read once (its layout is cached), then the same header with
    # its dimensions of 1 written as True (equal to 1, and of the same hash)
    record = ArrayRecord({"a": Array(np.ones((1, 1), np.float32))})
    content = wire.pack(content_of(record))
    wire.unpack(content)
    dims = list(content.config_records[wire.LAYOUT]["arrays:dims"])  # type: ignore[arg-type]
    assert dims == [1, 1]

    # Execute + Assert: refused as the first read would refuse it
    hostile = with_header(content, **{"arrays:dims": [True, True]})
    with pytest.raises(PackedLayoutError, match="is not a list of integers"):
        wire.unpack(hostile)


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_a_truncated_payload_is_refused(cut: int) -> None:
    content = packed_content()
    payload = content.array_records[wire.ARRAYS][wire.PACKED].numpy()
    content.array_records[wire.ARRAYS][wire.PACKED] = Array(payload[:-cut])
    with pytest.raises(PackedLayoutError, match="truncated"):
        wire.unpack(content)


def test_a_packed_record_with_other_arrays_or_an_undescribed_record_is_refused() -> None:
    content = packed_content()
    content.array_records[wire.ARRAYS]["extra"] = Array(np.zeros(3, np.float32))
    with pytest.raises(PackedLayoutError, match="expected \\['packed'\\]"):
        wire.unpack(content)
    content = packed_content()
    content["smuggled"] = ArrayRecord({"a": Array(np.zeros(3, np.float32))})
    with pytest.raises(PackedLayoutError, match="'smuggled' is not described"):
        wire.unpack(content)
    content = packed_content()
    content.array_records[wire.ARRAYS][wire.PACKED] = Array(np.zeros(10, np.float32))
    with pytest.raises(PackedLayoutError, match="packed array is float32"):
        wire.unpack(content)


# --------------------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------------------


class Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def site_reply(instruction: Message, shift: float) -> Message:
    """A site: 'train' (add ``shift``) and answer in the layout it received."""
    content, packed = wire.unpack(instruction.content)
    state = wire.from_array_record(content.array_records[wire.ARRAYS])
    local = {k: v + np.float32(shift) for k, v in state.items()}
    reply = RecordDict(
        {
            wire.ARRAYS: wire.to_array_record(local),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10}),
        }
    )
    return Message(wire.pack(reply) if packed else reply, reply_to=instruction)


def run_round(layout: str, spoil: Any = None) -> tuple[WeightedFedAvg, ArrayRecord | None, list]:
    strategy = WeightedFedAvg(min_available_clients=3, update_bound=None, wire_layout=layout)
    initial = wire.to_array_record(make_state(7))
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    replies = [site_reply(m, 0.01 * m.metadata.dst_node_id) for m in messages]
    if spoil is not None:
        spoil(replies[2])
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, arrays, messages


def test_a_packed_round_aggregates_as_the_arrays_layout_and_counts_the_header() -> None:
    # Execute: the same round in both layouts
    packed, packed_arrays, messages = run_round("packed")
    plain, plain_arrays, plain_messages = run_round("arrays")

    # Assert: the instructions went packed, the aggregate is identical
    assert all(wire.is_packed(m.content) for m in messages)
    assert not any(wire.is_packed(m.content) for m in plain_messages)
    assert packed_arrays is not None and plain_arrays is not None
    same_arrays(packed_arrays, plain_arrays)
    assert packed.report.accepted == [1, 2, 3]
    # Bytes: each way, the one array as it travels plus the layout header
    sent, received = packed.report.bytes_by_node[1]
    assert sent == wire.payload_bytes(messages[0].content)
    assert received > sum(v.nbytes for v in make_state(7).values())
    assert packed.report.bytes_down == 3 * sent
    assert plain.report.bytes_down == 3 * wire.num_bytes(plain_messages[0].content[wire.ARRAYS])  # type: ignore[arg-type]


def spoil_bytes(reply: Message) -> None:
    header = dict(reply.content.config_records[wire.LAYOUT])
    header["arrays:bytes"] = 12
    reply.content[wire.LAYOUT] = ConfigRecord(header)  # type: ignore[arg-type]


def spoil_keys(reply: Message) -> None:
    # A consistent header for the wrong adapter: the layout is fine, the keys are not
    content, _ = wire.unpack(reply.content)
    state = wire.from_array_record(content.array_records[wire.ARRAYS])
    state["intruder"] = np.zeros(3, np.float32)
    content[wire.ARRAYS] = wire.to_array_record(state)
    packed = wire.pack(content)
    for name in list(reply.content):
        del reply.content[name]
    for name, record in packed.items():
        reply.content[name] = record


def spoil_shape(reply: Message) -> None:
    content, _ = wire.unpack(reply.content)
    state = wire.from_array_record(content.array_records[wire.ARRAYS])
    key = next(iter(state))
    state[key] = state[key].reshape(-1)
    content[wire.ARRAYS] = wire.to_array_record(state)
    reply.content[wire.ARRAYS] = wire.pack(content)[wire.ARRAYS]
    reply.content[wire.LAYOUT] = wire.pack(content)[wire.LAYOUT]


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (spoil_bytes, "bad packed layout: 'arrays': arrays end at byte"),
        (spoil_keys, "intruder"),
        (spoil_shape, "shape"),
    ],
)
def test_a_bad_packed_reply_is_dropped_with_a_reason(spoil: Any, reason: str) -> None:
    strategy, arrays, _ = run_round("packed", spoil)
    assert reason in strategy.report.dropped[3]
    assert strategy.report.accepted == [1, 2]
    assert arrays is not None


def test_compressed_instructions_and_replies_travel_packed() -> None:
    # Prepare: an int8 round; sites reconstruct, 'train' and send the update packed
    from flower_llm import updates

    strategy = WeightedFedAvg(
        wire_dtype="int8", min_available_clients=3, update_bound=None, wire_layout="packed"
    )
    initial = wire.to_array_record(make_state(8))
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    replies = []
    for m in messages:
        node_state = RecordDict()
        content, packed = wire.unpack(m.content)
        assert packed and WIRE_FORMAT in content.config_records
        state, received = updates.receive(node_state, content)
        assert received is not None
        local = {k: v + np.float32(0.01) for k, v in state.items()}
        settings = updates.UplinkSettings("int8", 64, True, run_id=1, resume=False)
        arrays, head = updates.send_update(node_state, None, settings, local, state, received, 1)
        reply = RecordDict(
            {
                wire.ARRAYS: arrays,
                WIRE_FORMAT: head,
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10}),
            }
        )
        replies.append(Message(wire.pack(reply), reply_to=m))

    # Execute
    new, _ = strategy.aggregate_train(1, replies)

    # Assert: codes and scales in one array; every site's update used
    assert list(replies[0].content.array_records[wire.ARRAYS]) == [wire.PACKED]
    assert strategy.report.accepted == [1, 2, 3]
    assert new is not None
    start, after = wire.from_array_record(initial), wire.from_array_record(new)
    for key in start:
        np.testing.assert_allclose(after[key] - start[key], 0.01, atol=1e-3)


def test_the_wire_layout_setting_is_checked() -> None:
    assert parse_run_config({}).fed.wire_layout == "packed"
    assert parse_run_config({"fed.wire-layout": "arrays"}).fed.wire_layout == "arrays"
    with pytest.raises(ValueError, match=r"fed\.wire-layout"):
        parse_run_config({"fed.wire-layout": "zip"})
    with pytest.raises(ValueError, match="wire_layout"):
        WeightedFedAvg(wire_layout="zip")


# --------------------------------------------------------------------------------------
# The ClientApp
# --------------------------------------------------------------------------------------


@pytest.mark.long
def test_the_clientapp_answers_in_the_layout_it_received(tiny_model_dir: Path) -> None:
    # Prepare: the same instruction packed and not, to one site of the tiny model
    from client_apps.qlora import app

    cfg = {
        "model.name": str(tiny_model_dir),
        "train.local-steps": 1,
        "train.batch-size": 4,
        "output.local-only-baseline": False,
    }
    initial = wire.to_array_record(_initial_adapter(tiny_model_dir))
    instruction = content_of(initial)
    instruction[wire.CONFIG] = ConfigRecord({wire.SERVER_ROUND: 1, wire.LEARNING_RATE: 1e-3})
    replies = {}
    for layout, content in (("packed", wire.pack(instruction)), ("arrays", instruction)):
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 2},
            state=RecordDict(),
            run_config=cfg,
        )
        msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
        replies[layout] = app(msg, context)

    # Assert: packed in, packed out (one array); arrays in, arrays out; same adapter
    packed, plain = replies["packed"], replies["arrays"]
    assert not packed.has_error() and not plain.has_error()
    assert wire.is_packed(packed.content) and not wire.is_packed(plain.content)
    assert list(packed.content.array_records[wire.ARRAYS]) == [wire.PACKED]
    unpacked, _ = wire.unpack(packed.content)
    assert list(unpacked.array_records[wire.ARRAYS]) == list(initial)
    np.testing.assert_allclose(
        np.concatenate([v.ravel() for v in wire.from_array_record(unpacked[wire.ARRAYS]).values()]),  # type: ignore[arg-type]
        np.concatenate(
            [v.ravel() for v in wire.from_array_record(plain.content[wire.ARRAYS]).values()]
        ),  # type: ignore[arg-type]
        rtol=1e-4,
        atol=1e-6,
    )
    assert wire.unpack(packed.content)[0].metric_records[wire.METRICS][wire.NUM_EXAMPLES] > 0


def _initial_adapter(tiny_model_dir: Path) -> dict[str, np.ndarray]:
    from flower_llm.adapters import init_adapter

    cfg = parse_run_config({"model.name": str(tiny_model_dir)})
    state, _ = init_adapter(cfg.model, cfg.lora, str(tiny_model_dir), seed=0)
    return state


def test_a_record_of_scalars_round_trips_without_dims() -> None:
    record = ArrayRecord({"s": Array(np.array(3.5, np.float32)), "t": Array(np.array(7, np.int64))})
    packed = wire.pack(content_of(record))
    assert "arrays:dims" not in packed.config_records[wire.LAYOUT]  # an empty list: left out
    assert packed.config_records[wire.LAYOUT].count_bytes() > 0
    unpacked, _ = wire.unpack(packed)
    same_arrays(unpacked.array_records[wire.ARRAYS], record)


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_to_array_record_writes_the_bytes_flower_writes_and_views_read_them(
    wire_dtype: str,
) -> None:
    # Prepare: arrays of every rank, an empty one, a float64 one to cast
    rng = np.random.default_rng(3)
    state = {
        "a": rng.standard_normal((8, 300)).astype(np.float32),
        "b": rng.standard_normal((300, 8)),
        "scalar": np.full((), 2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }

    # Execute
    record = wire.to_array_record(state, wire_dtype)

    # Assert: byte for byte what Array(ndarray) (np.save) makes, and viewed back exactly
    dtype = wire.WIRE_DTYPES[wire_dtype]
    for key, value in state.items():
        flower = Array(np.ascontiguousarray(value, dtype=dtype))
        ours = record[key]
        assert (ours.dtype, ours.shape, ours.stype) == (flower.dtype, flower.shape, flower.stype)
        assert ours.data == flower.data, key
        view = wire.array_view(ours)
        assert view.dtype == dtype and view.shape == flower.numpy().shape
        np.testing.assert_array_equal(view, flower.numpy())


def test_array_view_does_not_trust_a_header_that_differs_from_np_save() -> None:
    # Prepare: a float32 array whose .npy header claims Fortran order (the values are
    # those of the transpose), and one whose header says big-endian
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    fortran = Array(np.asfortranarray(values))
    big = Array(values.astype(">f4"))

    # Execute
    fortran_view = wire.array_view(fortran)
    big_view = wire.array_view(big)

    # Assert: both read as Flower's own numpy() reads them
    np.testing.assert_array_equal(fortran_view, fortran.numpy())
    np.testing.assert_array_equal(big_view, values)
