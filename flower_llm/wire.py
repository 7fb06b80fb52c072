"""Adapter state <-> Flower records, and the keys both sides of the wire share.

One place names every record and metric key, so the ClientApp, the ServerApp and the
strategies cannot drift apart.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

if TYPE_CHECKING:  # adapters imports torch and peft; the wire format needs only numpy
    from flower_llm.adapters import AdapterState

# Record names inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
LOCAL_ONLY_ARRAYS = "local-only-arrays"
# ConfigRecord naming the site a reply comes from ({"label": "partition 2/4"}): with a
# local-only adapter, and whenever the instruction asks (SITE_LABEL).
SITE = "site"
# ConfigRecord header of a compressed message (flower_llm.compression.Header).
WIRE_FORMAT = "wire-format"
# ConfigRecord of an ``initial`` instruction (flower_llm.updates.InitialRecipe): what the
# run's seeded initial adapter is made of; the site rebuilds it instead of receiving it.
INITIAL = "initial-adapter"

# Metric keys in replies. A train reply carries what every ``fed.weighting`` needs:
# what the site holds (n_k of FedAvg) and what it trained on this round.
NUM_EXAMPLES = "num-examples"
"""Training examples the site holds (train reply); held-out examples (evaluate reply)."""
NUM_TOKENS = "num-tokens"
"""Response tokens in the site's training examples."""
NUM_EXAMPLES_SEEN = "num-examples-seen"
"""Examples trained on this round, counting repeats."""
NUM_TOKENS_SEEN = "num-tokens-seen"
"""Response tokens trained on this round, counting repeats."""
COUNT_METRICS = (NUM_EXAMPLES, NUM_TOKENS, NUM_EXAMPLES_SEEN, NUM_TOKENS_SEEN)
"""Counts the server sums over sites rather than averages."""
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_PERPLEXITY = "eval-perplexity"
EVAL_TOKEN_ACCURACY = "eval-token-accuracy"
EVAL_TOKENS = "eval-tokens"
TRAIN_SECONDS = "train-seconds"
# Sample-level epsilon of a site under DP-SGD; the server keeps the maximum, never a mean.
DPSGD_EPSILON = "dpsgd-epsilon"
# The same under each accountant (DPSGD_EPSILON is the one privacy.accountant names).
DPSGD_PLD_EPSILON = "dpsgd-pld-epsilon"
DPSGD_RDP_EPSILON = "dpsgd-rdp-epsilon"

# Config keys in instructions.
SERVER_ROUND = "server-round"
LEARNING_RATE = "learning-rate"
SEND_LOCAL_ONLY = "send-local-only"
# client-fixed DP-FedAvg: the L2 bound a client must clip its update to before replying.
CLIP_NORM = "clip-norm"
# Evaluate instruction: True asks the site to answer its task files too (when its
# eval.tasks is on); absent or False: held-out loss only, as a stock Flower strategy gets.
EVAL_TASKS = "eval-tasks"
# Train and evaluate instructions: True asks the site to name itself in its reply (the
# ``site`` ConfigRecord), so the server can label its per-site figures; absent: no record.
SITE_LABEL = "site-label"

WIRE_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    # The compressed formats (flower_llm.compression) send updates; a whole adapter (the
    # first round, a site that missed rounds, a local-only baseline) goes as float32.
    "bfloat16": np.float32,
    "int8": np.float32,
    "nf4": np.float32,
}


def to_array_record(state: Mapping[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """Pack a whole adapter state for sending; float16 halves the bytes on the wire.

    Each ``Array`` holds the bytes ``Array(ndarray)`` would (an ``.npy`` file), built from
    a cached header plus the values instead of through ``np.save`` (about 4x faster for a
    small array; the server publishes every array of the adapter each round).
    """
    dtype = np.dtype(WIRE_DTYPES[wire_dtype])
    name = str(dtype)
    record = {}
    for key, value in state.items():
        values = np.ascontiguousarray(value, dtype=dtype)
        header = _npy_header(dtype.str, values.shape)
        if header is None or values.dtype.byteorder == ">":
            record[key] = Array(values)
            continue
        record[key] = Array(
            dtype=name,
            shape=values.shape,
            stype="numpy.ndarray",
            data=header + values.tobytes(),
        )
    return ArrayRecord(record)


@functools.lru_cache(maxsize=4096)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes | None:
    """The version 1.0 ``.npy`` header ``np.save`` writes for a C-order array of ``descr``
    and ``shape``, or None if that header would not fit version 1.0. Bounded cache: a
    reply's shapes are the sender's to choose."""
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(
            buffer, {"descr": descr, "fortran_order": False, "shape": shape}
        )
    except ValueError:
        return None
    return buffer.getvalue()


@functools.lru_cache(maxsize=4096)
def _npy_layout(dtype_name: str, shape: tuple[int, ...]) -> tuple[np.dtype, int, bytes] | None:
    """``(dtype, number of values, np.save's header)`` of an ``Array`` of ``dtype_name``
    and ``shape``, or None if they do not describe a plain array."""
    try:
        dtype = np.dtype(dtype_name)
        count = math.prod(int(n) for n in shape)
    except (TypeError, ValueError):
        return None
    if dtype.names is not None or dtype.subdtype is not None or dtype.hasobject:
        return None
    if count < 0 or any(int(n) < 0 for n in shape):
        return None
    header = _npy_header(dtype.str, tuple(int(n) for n in shape))
    return None if header is None else (dtype, count, header)


def array_view(array: Array) -> np.ndarray:
    """The values of a Flower ``Array`` as a read-only numpy view of its bytes (no copy).

    ``Array.numpy()`` parses the ``.npy`` header with ``ast.literal_eval`` and copies the
    values, ~40 us per array before the copy; a server decoding 1000 replies of 224 arrays
    spends most of its aggregation time there. The ``Array`` already carries dtype and
    shape, and ``np.save`` puts the values last, so they are viewed in place. Anything
    that is not a plain C-order ``.npy`` of exactly that dtype and size goes through
    ``numpy()``. ``np.frombuffer`` is bounds-checked: a reply whose metadata lies cannot
    read outside its own bytes.
    """
    data, shape = array.data, array.shape
    if array.stype == "numpy.ndarray" and type(shape) is tuple:
        # The usual case, a header exactly as np.save writes it: one comparison.
        try:
            known = _npy_layout(array.dtype, shape)
        except TypeError:  # unhashable parts: not a layout np.save writes
            known = None
        if known is not None:
            dtype, count, header = known
            if len(data) == len(header) + count * dtype.itemsize and data.startswith(header):
                return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(
                    shape
                )
    try:
        dtype = np.dtype(array.dtype)
        count = math.prod(int(n) for n in array.shape)
    except (TypeError, ValueError):
        return np.asarray(array.numpy())
    offset = len(data) - count * dtype.itemsize
    header = data[:offset] if 10 <= offset <= 4096 else b""
    if (
        array.stype != "numpy.ndarray"
        or not header.startswith(b"\x93NUMPY")
        or b"'fortran_order': False" not in header
        or f"'descr': '{dtype.str}'".encode() not in header
    ):
        return np.asarray(array.numpy())
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(array.shape)


def array_views(record: ArrayRecord) -> AdapterState:
    """Every array of ``record`` as a read-only view (see :func:`array_view`), float only.

    For the server, which only reads replies: no per-reply copy, any float dtype as sent.
    """
    state: AdapterState = {}
    for key, array in record.items():
        values = array_view(array)
        if values.dtype.kind != "f":  # np.issubdtype costs ~2 us an array
            raise ValueError(f"array '{key}' has dtype {values.dtype}, expected a float type")
        state[key] = values
    return state


def from_array_record(record: ArrayRecord) -> AdapterState:
    """Unpack to writable float32 arrays, whatever float dtype was sent."""
    return {key: values.astype(np.float32) for key, values in array_views(record).items()}


class FlatState(dict):  # type: ignore[type-arg]
    """An adapter state (key -> array) whose arrays are views into ONE 1-D array,
    :attr:`flat`: every value in key order, one dtype, nothing between two arrays.

    The server's sweep reads a reply (or the reference) as that one array instead of one
    array per tensor: the per-tensor Python of a round (taking the address of 20 x 56
    arrays, say) is gone. Keys cannot be set or removed (that would part the views from
    :attr:`flat`); the values stay as writable as the buffer they view. Pickles as a plain
    dict.
    """

    __slots__ = ("flat", "layout")

    flat: np.ndarray
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    """``(key, shape)`` of each array, in order: two FlatStates of equal layouts hold the
    same arrays at the same places of :attr:`flat`."""

    def __init__(self, flat: np.ndarray, layout: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
        """Views of ``flat`` (1-D, contiguous) cut by ``layout``: ``(key, shape)`` in
        order, back to back from its start to its end."""
        if flat.ndim != 1 or not flat.flags.c_contiguous:
            raise ValueError("a FlatState needs a contiguous 1-D array")
        cuts = _cuts(layout)
        end = cuts[-1][2] if cuts else 0
        if end != flat.size:
            raise ValueError(f"arrays of {end} values cut from {flat.size}")
        super().__init__((key, flat[start:stop].reshape(shape)) for key, start, stop, shape in cuts)
        self.flat = flat
        self.layout = layout

    def _read_only(self, *_: object, **__: object) -> None:
        raise TypeError("a FlatState's keys are fixed (its arrays view one buffer)")

    __setitem__ = __delitem__ = _read_only  # type: ignore[assignment]
    update = setdefault = pop = popitem = clear = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


@functools.lru_cache(maxsize=64)
def _cuts(
    layout: tuple[tuple[str, tuple[int, ...]], ...],
) -> tuple[tuple[str, int, int, tuple[int, ...]], ...]:
    """``(key, start, stop, shape)`` of each array of a :class:`FlatState` layout. Bounded
    cache: a reply's layout is its sender's to choose."""
    cuts, start = [], 0
    for key, shape in layout:
        stop = start + math.prod(shape)
        cuts.append((key, start, stop, shape))
        start = stop
    return tuple(cuts)


def flat_copy(state: Mapping[str, np.ndarray], dtype: type = np.float32) -> FlatState:
    """``state`` copied into one contiguous buffer of ``dtype``: a :class:`FlatState`."""
    flat: np.ndarray = np.empty(sum(v.size for v in state.values()), dtype)
    start = 0
    for value in state.values():
        flat[start : start + value.size] = value.reshape(-1)
        start += value.size
    return FlatState(flat, tuple((k, v.shape) for k, v in state.items()))


def num_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of the arrays in ``record`` (values plus small per-array headers)."""
    return int(sum(len(array.data) for array in record.values()))


# --------------------------------------------------------------------------------------
# Packed layout (``fed.wire-layout = packed``): one array per ArrayRecord
# --------------------------------------------------------------------------------------
#
# Flower 1.42 stores a message as content-addressed objects and moves each with its own
# HTTPS request: an ArrayRecord of 28 arrays is 28 array objects plus their chunks. A
# packed message carries each non-empty ArrayRecord as ONE uint8 array, PACKED, holding the
# raw bytes of the original arrays (C order, little-endian) in the record's key order,
# each starting at a multiple of PACK_ALIGN bytes (zero padding between them), and one
# ConfigRecord LAYOUT saying how to cut them apart:
#
#   format = "flower-llm/packed-arrays", format-version = 1,
#   records = [names of the packed ArrayRecords],
#   and for each name r: "r:keys" (str), "r:dtypes" (numpy names, PACK_DTYPES),
#   "r:ranks" (int, one per array), "r:dims" (int, the shapes concatenated),
#   "r:offsets" (int, byte offset of each array), "r:bytes" (int, the payload length).
#
# Empty ArrayRecords (a compressed "same" message) travel as they are (the header, with no
# records, still says the message is packed, so the reply is packed too). The layout is
# written down in docs/aggregation.md, "Wire layout".

PACKED = "packed"
"""Name of the one array of a packed ArrayRecord."""
LAYOUT = "wire-layout"
"""ConfigRecord name of the packed layout header."""
LAYOUT_FORMAT = "flower-llm/packed-arrays"
LAYOUT_VERSION = 1
PACK_ALIGN = 8
PACK_DTYPES = ("float32", "float16", "uint16", "int8", "uint8", "int64")
"""Array dtypes a packed record may hold: adapters (float32, float16) and the compressed
codes, scales and shapes of flower_llm.compression."""
_MAX_RANK = 8


class PackedLayoutError(ValueError):
    """A packed message whose header does not describe its bytes; the message says why."""


def _aligned(offset: int) -> int:
    return -(-offset // PACK_ALIGN) * PACK_ALIGN


def is_packed(content: RecordDict) -> bool:
    """Whether ``content`` uses the packed layout (it carries a :data:`LAYOUT` header)."""
    # Not ``content.config_records``: Flower builds that view anew at each access.
    return isinstance(content.get(LAYOUT), ConfigRecord)


def pack(content: RecordDict) -> RecordDict:
    """``content`` with every non-empty ArrayRecord packed into one array, plus the header.

    Other records are shared, not copied. Content without arrays gets the header too
    (``records`` empty): a compressed ``same`` instruction still tells the site which
    layout to reply in.
    """
    packed_names = [name for name, record in content.array_records.items() if len(record)]
    # Flower cannot count or send an empty list in a ConfigRecord: an empty list is left
    # out ("records" with nothing packed, "R:dims" of scalars) and read back as [].
    header: dict[str, object] = {"format": LAYOUT_FORMAT, "format-version": LAYOUT_VERSION}
    if packed_names:
        header["records"] = packed_names
    out = RecordDict()
    for name, record in content.items():
        if name in packed_names:
            assert isinstance(record, ArrayRecord)
            array, fields = _pack_record(record)
            out[name] = ArrayRecord({PACKED: Array(array)})
            header.update(
                {f"{name}:{field}": value for field, value in fields.items() if value != []}
            )
        else:
            out[name] = record
    if LAYOUT in out:
        raise ValueError(f"content already holds a record named {LAYOUT!r}")
    out[LAYOUT] = ConfigRecord(header)  # type: ignore[arg-type]
    return out


def _pack_record(record: ArrayRecord) -> tuple[np.ndarray, dict[str, object]]:
    values = [array_view(array) for array in record.values()]
    for key, value in zip(record, values, strict=True):
        if value.dtype.name not in PACK_DTYPES:
            raise ValueError(f"array '{key}' has dtype {value.dtype}, not one of {PACK_DTYPES}")
    offsets, end = [], 0
    for value in values:
        offsets.append(_aligned(end))
        end = offsets[-1] + value.nbytes
    payload = np.zeros(end, np.uint8)
    for offset, value in zip(offsets, values, strict=True):
        little = value.astype(value.dtype.newbyteorder("<"), copy=False)
        payload[offset : offset + value.nbytes] = (
            np.ascontiguousarray(little).view(np.uint8).ravel()
        )
    fields: dict[str, object] = {
        "keys": list(record),
        "dtypes": [v.dtype.name for v in values],
        "ranks": [v.ndim for v in values],
        "dims": [int(d) for v in values for d in v.shape],
        "offsets": offsets,
        "bytes": end,
    }
    return payload, fields


def unpack(content: RecordDict) -> tuple[RecordDict, bool]:
    """``content`` in the arrays layout, and whether it came packed.

    Content without a :data:`LAYOUT` header comes back as it is. The header is checked
    against the bytes before anything is read: format and version, record names, keys
    (strings, unique), known dtypes, ranks and dimensions, every offset where the layout
    puts it, and the payload exactly as long as the arrays it holds.

    Raises
    ------
    PackedLayoutError
        The header does not describe the bytes.
    """
    out, _, packed = _unpacked(content, None)
    return out, packed


def unpack_views(content: RecordDict, name: str = ARRAYS) -> tuple[RecordDict, AdapterState | None]:
    """:func:`unpack`, except that record ``name`` comes back apart, as read-only views
    of its values (:func:`array_views`: float dtypes only), and not in the content.

    For the server, which reads a reply's adapter once: from a packed reply the views
    point into the packed payload itself, so nothing is copied or re-serialised (unpacking
    into ``Array`` objects costs several times the aggregation of the values). None:
    the content has no record ``name``.

    Raises
    ------
    PackedLayoutError
        The header does not describe the bytes.
    ValueError
        An array of record ``name`` is not of a float dtype.
    """
    out, views, packed = _unpacked(content, name)
    if packed:
        if views is None and isinstance(out.get(name), ArrayRecord):
            views = array_views(out.array_records[name])  # present but empty: not packed
            del out[name]
        return out, views
    if name not in content.array_records:
        return content, None
    views = array_views(content.array_records[name])
    rest = RecordDict()
    for key, item in content.items():
        if key != name:
            rest[key] = item
    return rest, views


def _unpacked(
    content: RecordDict, views_of: str | None
) -> tuple[RecordDict, AdapterState | None, bool]:
    """:func:`unpack`, with record ``views_of`` (when packed) as views instead."""
    if not is_packed(content):
        return content, None, False
    header = content[LAYOUT]
    assert isinstance(header, ConfigRecord)
    if header.get("format") != LAYOUT_FORMAT:
        raise PackedLayoutError(f"format {header.get('format')!r}, expected {LAYOUT_FORMAT!r}")
    if header.get("format-version") != LAYOUT_VERSION:
        raise PackedLayoutError(
            f"format version {header.get('format-version')!r}; this code reads {LAYOUT_VERSION}"
        )
    names = header.get("records", [])
    if problem := distinct_names_problem(names, "'records'", "record"):
        raise PackedLayoutError(problem)
    assert isinstance(names, list)
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and name not in names and len(record):
            raise PackedLayoutError(f"ArrayRecord '{name}' is not described by the header")
    out = RecordDict()
    views: AdapterState | None = None
    for name, item in content.items():
        if name == LAYOUT:
            continue
        if name in names:
            if not isinstance(item, ArrayRecord):
                raise PackedLayoutError(f"'{name}' is not an ArrayRecord")
            payload, layout = _checked_payload(name, item, header)
            if name == views_of:
                views = _flat_views(payload, layout) or _float_views(_cut(payload, layout))
            else:
                out[name] = _unpack_record(_cut(payload, layout))
        else:
            out[name] = item
    missing = [n for n in names if n not in out and (n != views_of or views is None)]
    if missing:
        raise PackedLayoutError(f"the header names records {missing} the message lacks")
    return out, views, True


def distinct_names_problem(value: object, field: str, item: str) -> str | None:
    """Why a header ``field`` is not a list of distinct, non-empty names; None when it is.

    For the headers that list records or arrays by name (this layout's, and the
    compressed-update header of :mod:`flower_llm.compression`): ``item`` is what each
    name names, for the message.
    """
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return f"{field} is not a list of {item} names"
    if len(set(value)) != len(value):
        article = "an" if item[:1] in "aeiou" else "a"
        return f"{field} names {article} {item} twice"
    return None


def _int_list(value: object, field: str) -> list[int]:
    """``value`` (a header field; None: absent, an empty list) as a list of integers."""
    value = [] if value is None else list(value) if isinstance(value, tuple) else value
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise PackedLayoutError(f"'{field}' is not a list of integers")
    return value


_FIELDS = ("keys", "dtypes", "ranks", "dims", "offsets")


_Layout = tuple[tuple[str, np.dtype[Any], tuple[int, ...], int, int], ...]


def _checked_payload(
    name: str, record: ArrayRecord, header: ConfigRecord
) -> tuple[np.ndarray, _Layout]:
    """The payload of packed record ``name`` (read-only uint8) and its layout, after
    every check of the header against the bytes."""
    fields = [header.get(f"{name}:{f}", None if f in ("keys", "dtypes") else []) for f in _FIELDS]
    total = header.get(f"{name}:bytes")
    # Every site of a round sends the same header: what follows from it alone is worked
    # out once (cached by value, and only for lists of exactly str / int: True == 1 must
    # not find the layout of a 1).
    plain = type(total) is int and all(type(f) is list for f in fields)
    if plain:
        kinds = [set(map(type, f)) for f in fields]  # type: ignore[arg-type]
        plain = kinds[0] <= {str} and kinds[1] <= {str} and all(k <= {int} for k in kinds[2:])
    if plain:
        layout = _layout(name, *(tuple(f) for f in fields), total)  # type: ignore[arg-type]
    else:
        layout = _layout.__wrapped__(name, *fields, total)
    if set(record) != {PACKED}:
        raise PackedLayoutError(f"'{name}' holds arrays {sorted(record)}, expected ['{PACKED}']")
    try:
        payload = array_view(record[PACKED])
    except Exception as err:  # a damaged .npy header: numpy raises its own types
        raise PackedLayoutError(f"'{name}': unreadable packed array: {err}") from err
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise PackedLayoutError(f"'{name}': packed array is {payload.dtype}, {payload.ndim}-D")
    assert isinstance(total, int)  # checked with the layout
    end = layout[-1][3] + layout[-1][4] if layout else 0
    if len(payload) != total:
        raise PackedLayoutError(
            f"'{name}': arrays end at byte {end}, header says {total}, payload holds "
            f"{len(payload)} (truncated?)"
        )
    return payload, layout


def _cut(payload: np.ndarray, layout: _Layout) -> dict[str, np.ndarray]:
    """The arrays of a checked payload, as views."""
    return {
        key: payload[offset : offset + size].view(dtype).reshape(shape)
        for key, dtype, shape, offset, size in layout
    }


def _flat_views(payload: np.ndarray, layout: _Layout) -> FlatState | None:
    """The arrays of a checked payload as a :class:`FlatState` over the whole payload,
    or None unless they are all of one native float dtype and lie back to back (no
    padding: the padding bytes are the sender's and are not values)."""
    dense = _dense(layout)
    if dense is None:
        return None
    dtype, items = dense
    return FlatState(payload.view(dtype), items)


@functools.lru_cache(maxsize=64)
def _dense(layout: _Layout) -> tuple[np.dtype[Any], tuple[tuple[str, tuple[int, ...]], ...]] | None:
    """``(dtype, ((key, shape), ...))`` of a layout whose arrays share one native float
    dtype and leave no gap between them, else None. Bounded cache, as :func:`_layout`."""
    if not layout:
        return None
    dtype = layout[0][1]
    if dtype.kind != "f" or dtype != dtype.newbyteorder("="):
        return None
    end = 0
    for _, each, _, offset, size in layout:
        if each != dtype or offset != end:
            return None
        end = offset + size
    return dtype, tuple((key, shape) for key, _, shape, _, _ in layout)


@functools.lru_cache(maxsize=64)
def _layout(
    name: str,
    keys: object,
    dtypes: object,
    ranks_in: object,
    dims_in: object,
    offsets_in: object,
    total: object,
) -> _Layout:
    """``(key, little-endian dtype, shape, offset, bytes)`` of each array the header
    fields describe, after every check that needs the header alone (types, lengths,
    ranks and dimensions, each offset where the layout puts it, the end at ``bytes``).
    Bounded cache: headers are the senders' to choose."""
    if problem := distinct_names_problem(
        list(keys) if isinstance(keys, tuple) else keys, f"'{name}:keys'", "array"
    ):
        raise PackedLayoutError(problem)
    assert isinstance(keys, list | tuple)
    if not isinstance(dtypes, list | tuple) or not all(d in PACK_DTYPES for d in dtypes):
        dtypes = list(dtypes) if isinstance(dtypes, tuple) else dtypes
        raise PackedLayoutError(f"'{name}:dtypes' {dtypes!r} is not a list of {PACK_DTYPES}")
    keys, dtypes = [str(k) for k in keys], [str(d) for d in dtypes]
    ranks = _int_list(ranks_in, f"{name}:ranks")
    dims = _int_list(dims_in, f"{name}:dims")
    offsets = _int_list(offsets_in, f"{name}:offsets")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise PackedLayoutError(f"'{name}:bytes' {total!r} is not a byte count")
    if not len(keys) == len(dtypes) == len(ranks) == len(offsets):
        raise PackedLayoutError(
            f"'{name}': {len(keys)} keys, {len(dtypes)} dtypes, {len(ranks)} ranks, "
            f"{len(offsets)} offsets"
        )
    if any(not 0 <= r <= _MAX_RANK for r in ranks) or sum(ranks) != len(dims):
        raise PackedLayoutError(f"'{name}:ranks' do not match '{name}:dims'")
    if any(d < 0 or d > 2**31 for d in dims):
        raise PackedLayoutError(f"'{name}:dims' holds a negative or implausibly large size")
    # Where every array must start, from the sizes alone; the header must agree.
    layout, end, start = [], 0, 0
    for key, dtype_name, rank, offset in zip(keys, dtypes, ranks, offsets, strict=True):
        shape = tuple(dims[start : start + rank])
        start += rank
        if offset != _aligned(end):
            raise PackedLayoutError(
                f"'{name}': array '{key}' at offset {offset}, expected {_aligned(end)}"
            )
        dtype = np.dtype(dtype_name).newbyteorder("<")
        size = math.prod(shape) * dtype.itemsize
        end = offset + size
        layout.append((key, dtype, shape, offset, size))
    if end != total:
        raise PackedLayoutError(
            f"'{name}': arrays end at byte {end}, header says {total} (truncated?)"
        )
    return tuple(layout)


def _unpack_record(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The arrays layout of a packed record's values: one ``Array`` each."""
    # np.array keeps a 0-d shape (ascontiguousarray would make it 1-d)
    return ArrayRecord(
        {
            key: Array(np.array(value, dtype=value.dtype.newbyteorder("="), order="C"))
            for key, value in values.items()
        }
    )


def _float_views(values: Mapping[str, np.ndarray]) -> AdapterState:
    """``values`` in native byte order (a view where they already are), float only, as
    :func:`array_views` gives them."""
    state: AdapterState = {}
    for key, value in values.items():
        if value.dtype.kind != "f":
            raise ValueError(f"array '{key}' has dtype {value.dtype}, expected a float type")
        native = value.dtype.newbyteorder("=")
        state[key] = value if value.dtype == native else value.astype(native)
    return state


def payload_bytes(content: RecordDict, name: str = ARRAYS) -> int:
    """Bytes of the ArrayRecord ``name`` as sent, plus the packed layout header if any.

    What the ``bytes-*`` columns count; the packed header is part of what the adapter
    costs on the wire, so it counts with it. An ``initial`` instruction carries no arrays
    in their place but its compression header and recipe (:data:`INITIAL`): they count.
    """
    record = content.array_records.get(name)
    sent = num_bytes(record) if record is not None else 0
    if is_packed(content):
        sent += content.config_records[LAYOUT].count_bytes()
    if INITIAL in content.config_records:
        for name in (INITIAL, WIRE_FORMAT):
            if name in content.config_records:
                sent += config_bytes(content.config_records[name])
    return sent


def config_bytes(record: ConfigRecord) -> int:
    """Bytes of ``record`` counted as ``ConfigRecord.count_bytes`` counts them (keys, 8 per
    number, 1 per bool, the length of a string), which raises on an empty string or list."""

    def scalar(value: object) -> int:
        if isinstance(value, bool):
            return 1
        if isinstance(value, str | bytes):
            return len(value)
        return 8

    return sum(
        len(key) + sum(scalar(v) for v in (value if isinstance(value, list) else [value]))
        for key, value in record.items()
    )


def message_bytes(content: RecordDict) -> int:
    """Bytes of every ArrayRecord in ``content``, plus the packed layout header if any."""
    sent = sum(num_bytes(r) for r in content.values() if isinstance(r, ArrayRecord))
    header = content.get(LAYOUT)
    if isinstance(header, ConfigRecord):
        sent += header.count_bytes()
    return sent
