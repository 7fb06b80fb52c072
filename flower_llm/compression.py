"""Compressed adapter messages: bfloat16, blockwise int8 and NF4 codes, and error feedback.

The layout (``flower-llm/compressed-adapter``, version 1) is written down in
docs/aggregation.md, "Wire format", for a third party to decode. In short, a message
carries two records:

- a ConfigRecord :data:`WIRE_FORMAT` (:class:`Header`): format name and version, the
  codec, the block size, what the values are (``adapter``: the weights themselves;
  ``update``: a difference to a global adapter both sides hold; ``same``: nothing, the
  receiver keeps what it holds; ``initial``: nothing, the receiver rebuilds the run's
  seeded initial adapter itself, format version 2), the global version and digest they
  refer to, and the adapter keys in the order their values are concatenated;
- an ArrayRecord of at most four arrays: ``codes`` (the values of every tensor, flattened
  in C order and concatenated in key order, encoded), ``scales`` (float32, one per block of
  ``block-size`` consecutive values of one tensor, int8 and nf4 only), ``shape-ranks``
  (int64, one per tensor) and ``shape-dims`` (int64, the tensors' dimensions, concatenated).

Codecs, for a block ``x`` with ``s = max |x|``:

- ``float32``: the values as they are (a full adapter sent to a site that missed rounds);
- ``bfloat16``: the upper 16 bits of each float32 after round-to-nearest-even (uint16);
  relative error at most ``2^-8``;
- ``int8``: ``c = round(127 x / s)`` in ``[-127, 127]``, decoded ``c * s / 127``; error at
  most ``s / 254`` per value;
- ``nf4``: the index of the nearest of the 16 NormalFloat levels ``q_i`` to ``x / s``, two
  per byte (first value in the high nibble), decoded ``q_c * s``; error at most
  ``0.1519 s`` per value (half the widest gap, between -1 and -0.6962).

Decoding checks everything (:class:`WireFormatError` names what is wrong): format and
version, codec, block size, key list against the shapes, array dtypes and lengths against
the shapes, code ranges (int8 -128 is never produced), finite non-negative scales, bfloat16
codes that are finite numbers.

Error feedback (:func:`compress_with_feedback`): the value sent is ``Q(u + e)`` and the new
residual ``e' = u + e - D(Q(u + e))``, so what the receiver has summed after ``T`` rounds
differs from the sum of the true updates by the last residual only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from flower_llm import wire

AdapterState = dict[str, np.ndarray]

FORMAT = "flower-llm/compressed-adapter"
FORMAT_VERSION = 2
"""Version 2 added the ``initial`` content; a version 1 header (a checkpoint's) still reads."""
READABLE_VERSIONS = (1, 2)
#: ConfigRecord name of the header in a message's RecordDict (named in flower_llm.wire).
WIRE_FORMAT = wire.WIRE_FORMAT

#: Codecs that send updates (``fed.wire-dtype``); float32 and float16 send whole adapters.
COMPRESSED_CODECS = ("bfloat16", "int8", "nf4")
#: Codecs a message may carry (float32: a whole adapter for a site that missed rounds).
MESSAGE_CODECS = ("float32", *COMPRESSED_CODECS)
BLOCK_CODECS = ("int8", "nf4")
CONTENTS = ("adapter", "update", "same", "initial")
#: Codecs an ``initial`` header may name: the run's ``fed.wire-dtype``, whose whole-adapter
#: rounding (float16) the receiver applies to what it rebuilds.
INITIAL_CODECS = ("float32", "float16", *COMPRESSED_CODECS)
#: Contents that carry no arrays.
EMPTY_CONTENTS = ("same", "initial")
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 2, 2**20

#: The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023, appendix E): quantiles of a
#: standard normal, normalised to [-1, 1], with an exact zero. Values as bitsandbytes
#: 0.50.2 lists them (``bitsandbytes.functional.get_4bit_type("nf4")``), checked there.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
_NF4_MIDPOINTS = (NF4_LEVELS[1:].astype(np.float64) + NF4_LEVELS[:-1]) / 2  # exact
#: Per midpoint ``m``, the least float32 strictly above it: a float32 ``x`` is nearer the
#: upper level (ties going to the lower one) exactly when ``x >= threshold``.
_NF4_THRESHOLDS = np.array(
    [
        np.nextafter(np.float32(m), np.float32(np.inf)) if np.float32(m) <= m else np.float32(m)
        for m in _NF4_MIDPOINTS
    ],
    dtype=np.float32,
)
_NF4_ZERO = 7

#: Largest error of one decoded value, relative to its block's absmax (bfloat16: to the
#: value itself). Error feedback keeps a residual of at most this times the block's absmax.
RELATIVE_ERROR = {
    "float32": 0.0,
    "bfloat16": 2.0**-8,
    "int8": 1 / 254,
    "nf4": float(np.max(np.diff(NF4_LEVELS))) / 2,  # between -1 and -0.6962: 0.1519
}


class WireFormatError(ValueError):
    """A compressed message that cannot be decoded; the message says why."""


@dataclass(frozen=True)
class Header:
    """What a compressed message is (the :data:`WIRE_FORMAT` ConfigRecord)."""

    codec: str
    block_size: int
    content: str
    """``adapter``, ``update``, ``same`` or ``initial``."""
    keys: tuple[str, ...]
    global_version: int
    """Down: the global version the receiver holds after applying the message. Up: the
    global version the update was trained from."""
    global_digest: str
    """:func:`digest` of that global adapter."""
    base_version: int = -1
    """Down ``update`` only: the version it applies to (-1 otherwise)."""
    base_digest: str = ""

    def to_record(self) -> ConfigRecord:
        """The header as it travels."""
        return ConfigRecord(
            {
                "format": FORMAT,
                "format-version": FORMAT_VERSION,
                "codec": self.codec,
                "block-size": self.block_size,
                "content": self.content,
                "keys": list(self.keys),
                "global-version": self.global_version,
                "global-digest": self.global_digest,
                "base-version": self.base_version,
                "base-digest": self.base_digest,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Header:
        """Parse and check a received header."""
        if record.get("format") != FORMAT:
            raise WireFormatError(f"format {record.get('format')!r}, expected {FORMAT!r}")
        version = record.get("format-version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise WireFormatError(
                f"format version {version!r}; this code reads versions {READABLE_VERSIONS}"
            )
        codec, content = record.get("codec"), record.get("content")
        if content not in CONTENTS or (content == "initial" and version == 1):
            raise WireFormatError(f"content {content!r} is not one of {CONTENTS}")
        codecs = INITIAL_CODECS if content == "initial" else MESSAGE_CODECS
        if codec not in codecs:
            raise WireFormatError(f"codec {codec!r} is not one of {codecs}")
        block = record.get("block-size")
        if not _is_int(block) or not MIN_BLOCK_SIZE <= block <= MAX_BLOCK_SIZE:  # type: ignore[operator]
            raise WireFormatError(
                f"block size {block!r} outside [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]"
            )
        keys = record.get("keys", [])
        if problem := wire.distinct_names_problem(keys, "'keys'", "array"):
            raise WireFormatError(problem)
        assert isinstance(keys, list)
        ints = {k: record.get(k) for k in ("global-version", "base-version")}
        strings = {k: record.get(k) for k in ("global-digest", "base-digest")}
        if not all(_is_int(v) for v in ints.values()):
            raise WireFormatError(f"versions {ints} are not integers")
        if not all(isinstance(v, str) for v in strings.values()):
            raise WireFormatError(f"digests {strings} are not strings")
        return cls(
            codec=str(codec),
            block_size=int(block),  # type: ignore[arg-type]
            content=str(content),
            keys=tuple(str(k) for k in keys),
            global_version=int(ints["global-version"]),  # type: ignore[arg-type]
            global_digest=str(strings["global-digest"]),
            base_version=int(ints["base-version"]),  # type: ignore[arg-type]
            base_digest=str(strings["base-digest"]),
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def digest(state: Mapping[str, np.ndarray]) -> str:
    """First 16 hex digits of SHA-256 over the keys (sorted), shapes and float32 bytes."""
    sha = hashlib.sha256()
    for key in sorted(state):
        value = np.ascontiguousarray(state[key], dtype=np.float32)
        sha.update(key.encode())
        sha.update(str(value.shape).encode())
        sha.update(value.tobytes())
    return sha.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Codecs over one flat float32 vector (values of every tensor, concatenated)
# --------------------------------------------------------------------------------------


def _block_layout(sizes: Sequence[int], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first value, number of values) of every block, in block order.

    Blocks never cross tensors: tensor ``i`` of ``n_i`` values has ``ceil(n_i / B)``, the
    last one short when ``B`` does not divide ``n_i``.
    """
    starts: list[np.ndarray] = []
    offset = 0
    for n in sizes:
        starts.append(np.arange(offset, offset + n, block_size, dtype=np.int64))
        offset += n
    first = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    lengths = np.diff(np.append(first, np.int64(offset)))
    return first, lengths


def block_count(sizes: Sequence[int], block_size: int) -> int:
    """Blocks (scales) of tensors of ``sizes`` values."""
    return int(sum(math.ceil(n / block_size) for n in sizes))


def _scales_of(flat: np.ndarray, sizes: Sequence[int], block_size: int) -> np.ndarray:
    """Absmax of every block, in block order."""
    first, _ = _block_layout(sizes, block_size)
    if not first.size:
        return np.zeros(0, np.float32)
    return np.maximum.reduceat(np.abs(flat), first).astype(np.float32, copy=False)


def _per_value(
    values: np.ndarray, sizes: Sequence[int], block_size: int, scales: np.ndarray, op: str
) -> np.ndarray:
    """``values`` divided (op ``div``) or multiplied (``mul``) by their block's scale
    (float32; a block of scale 0 is divided by 1)."""
    _, lengths = _block_layout(sizes, block_size)
    scale = np.repeat(scales, lengths)
    if op == "div":
        return values / np.where(scale > 0, scale, np.float32(1.0))
    return (values * scale).astype(np.float32, copy=False)


def _encode_flat(
    flat: np.ndarray, sizes: Sequence[int], codec: str, block_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(codes, scales) of a float32 vector."""
    if codec == "float32":
        return flat.astype(np.float32, copy=False), None
    if codec == "bfloat16":
        bits = flat.astype(np.float32, copy=False).view(np.uint32)
        # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, truncate.
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16), None
    scales = _scales_of(flat, sizes, block_size)
    normalised = _per_value(flat, sizes, block_size, scales, "div")  # in [-1, 1]
    if codec == "int8":
        codes = np.rint(normalised * np.float32(127.0))
        return np.clip(codes, -127, 127).astype(np.int8), scales
    # nf4: nearest level, ties to the lower one: the index is the number of midpoints
    # strictly below the value (15 vectorised comparisons beat a binary search ~10x).
    index = np.zeros(normalised.size, np.uint8)
    for threshold in _NF4_THRESHOLDS:
        index += normalised >= threshold
    if index.size % 2:
        index = np.append(index, np.uint8(0))
    packed = (index[0::2] << np.uint8(4)) | index[1::2]
    return packed.astype(np.uint8), scales


def _decode_flat(
    codes: np.ndarray,
    scales: np.ndarray | None,
    sizes: Sequence[int],
    codec: str,
    block_size: int,
) -> np.ndarray:
    total = int(sum(sizes))
    if codec == "float32":
        return codes.astype(np.float32)
    if codec == "bfloat16":
        return (codes.astype(np.uint32) << np.uint32(16)).view(np.float32)
    assert scales is not None
    if codec == "int8":
        levels = codes.astype(np.float32) / np.float32(127.0)
    else:
        unpacked = np.empty(codes.size * 2, np.uint8)
        unpacked[0::2] = codes >> np.uint8(4)
        unpacked[1::2] = codes & np.uint8(0x0F)
        levels = NF4_LEVELS[unpacked[:total]]
    return _per_value(levels, sizes, block_size, scales, "mul")


def expected_codes(codec: str, total: int) -> tuple[type, int]:
    """dtype and length of ``codes`` for ``total`` values."""
    return {
        "float32": (np.float32, total),
        "bfloat16": (np.uint16, total),
        "int8": (np.int8, total),
        "nf4": (np.uint8, (total + 1) // 2),
    }[codec]


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------


def encode(state: Mapping[str, np.ndarray], header: Header) -> ArrayRecord:
    """The ArrayRecord of ``state`` under ``header`` (its keys, in its order)."""
    if header.content in EMPTY_CONTENTS:
        return ArrayRecord()
    keys = list(header.keys)
    if set(keys) != set(state):
        raise ValueError("the header's keys must be the state's keys")
    values = [np.asarray(state[k], dtype=np.float32) for k in keys]
    sizes = [v.size for v in values]
    flat = (
        np.concatenate([v.ravel() for v in values]) if values else np.zeros(0, np.float32)
    ).astype(np.float32, copy=False)
    if not np.isfinite(flat).all():
        raise ValueError("cannot encode NaN or Inf")
    codes, scales = _encode_flat(flat, sizes, header.codec, header.block_size)
    arrays = {
        "codes": Array(np.ascontiguousarray(codes)),
        "shape-ranks": Array(np.array([v.ndim for v in values], np.int64)),
        "shape-dims": Array(np.array([d for v in values for d in v.shape], np.int64)),
    }
    if scales is not None:
        arrays["scales"] = Array(scales)
    return ArrayRecord(arrays)


def decode(record: ArrayRecord, header: Header) -> AdapterState:
    """The float32 arrays of a message, after checking every length, range and scale.

    Raises
    ------
    WireFormatError
        Anything that does not match ``header`` or the format.
    """
    if header.content in EMPTY_CONTENTS:
        if len(record):
            raise WireFormatError(f"a '{header.content}' message carries arrays")
        return {}
    wanted = {"codes", "shape-ranks", "shape-dims"} | (
        {"scales"} if header.codec in BLOCK_CODECS else set()
    )
    if set(record) != wanted:
        raise WireFormatError(f"arrays {sorted(record)}, expected {sorted(wanted)}")
    try:
        arrays = {name: wire.array_view(record[name]) for name in wanted}
    except Exception as err:  # a damaged .npy header: numpy raises its own types
        raise WireFormatError(f"unreadable array: {err}") from err
    ranks, dims = arrays["shape-ranks"], arrays["shape-dims"]
    if ranks.dtype != np.int64 or dims.dtype != np.int64 or ranks.ndim != 1 or dims.ndim != 1:
        raise WireFormatError("shape-ranks and shape-dims must be 1-D int64")
    if len(ranks) != len(header.keys):
        raise WireFormatError(f"{len(ranks)} shapes for {len(header.keys)} keys")
    if (ranks < 0).any() or (ranks > 8).any() or int(ranks.sum()) != len(dims):
        raise WireFormatError("shape-ranks do not match shape-dims")
    if (dims < 0).any() or (dims > 2**31).any():
        raise WireFormatError("a dimension is negative or implausibly large")
    shapes: list[tuple[int, ...]] = []
    start = 0
    for rank in ranks.tolist():
        shapes.append(tuple(int(d) for d in dims[start : start + rank]))
        start += rank
    sizes = [math.prod(s) for s in shapes]
    total = int(sum(sizes))
    codes = arrays["codes"]
    dtype, length = expected_codes(header.codec, total)
    if codes.dtype != np.dtype(dtype) or codes.ndim != 1 or len(codes) != length:
        raise WireFormatError(
            f"codes are {codes.dtype}[{codes.size}], expected {np.dtype(dtype)}[{length}] "
            f"for {total} values (truncated?)"
        )
    scales = None
    if header.codec in BLOCK_CODECS:
        scales = arrays["scales"]
        blocks = block_count(sizes, header.block_size)
        if scales.dtype != np.float32 or scales.ndim != 1 or len(scales) != blocks:
            raise WireFormatError(
                f"scales are {scales.dtype}[{scales.size}], expected float32[{blocks}]"
            )
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise WireFormatError("a scale is negative, NaN or Inf")
    if header.codec == "int8" and total and int(codes.min()) < -127:
        raise WireFormatError("int8 code -128 is outside [-127, 127]")
    if header.codec == "nf4" and total % 2 and codes[-1] & 0x0F:
        raise WireFormatError("the padding nibble of an odd-length nf4 message is not 0")
    if header.codec == "bfloat16" and total and ((codes & 0x7F80) == 0x7F80).any():
        raise WireFormatError("a bfloat16 code is NaN or Inf")
    if header.codec == "float32" and not np.isfinite(codes).all():
        raise WireFormatError("a float32 value is NaN or Inf")
    flat = _decode_flat(codes, scales, sizes, header.codec, header.block_size)
    out: AdapterState = {}
    start = 0
    for key, shape, n in zip(header.keys, shapes, sizes, strict=True):
        out[key] = flat[start : start + n].reshape(shape)
        start += n
    return out


def roundtrip(state: Mapping[str, np.ndarray], codec: str, block_size: int) -> AdapterState:
    """What the receiver decodes from ``state`` sent with ``codec`` (for error feedback)."""
    header = Header(codec, block_size, "update", tuple(state), 0, "")
    return decode(encode(state, header), header)


# --------------------------------------------------------------------------------------
# Error feedback
# --------------------------------------------------------------------------------------


@dataclass
class Compressed:
    """An update ready to send and what the receiver will decode from it."""

    record: ArrayRecord
    decoded: AdapterState
    residual: AdapterState | None
    """The new error-feedback residual (None: feedback off)."""


def compress_with_feedback(
    update: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    header: Header,
    *,
    feedback: bool,
    clip_norm: float | None = None,
) -> Compressed:
    """Send ``Q(v)`` with ``v = u + e`` (``e``: the residual, with feedback on).

    ``clip_norm`` (client-fixed DP-FedAvg): ``v`` is clipped to it first, and the decoded
    update is scaled down until its L2 norm is at most ``clip_norm`` too, since rounding
    to codes can lengthen it (absmax codes are scale-equivariant: scaling ``v`` scales
    the decoded values by the same factor up to float32 rounding of the scales). The
    residual ``v - D(Q(v))`` is the quantisation error only; what clipping removed is
    never carried over (a residual holding it would grow without bound).
    """
    keys = header.keys
    values = {k: np.asarray(update[k], np.float64) for k in keys}
    if feedback and residual is not None:
        for k in keys:
            if k in residual and residual[k].shape == values[k].shape:
                values[k] = values[k] + residual[k]
    if clip_norm is not None:
        values = _clip(values, clip_norm)
    target = {k: v.astype(np.float32) for k, v in values.items()}
    record = encode(target, header)
    decoded = decode(record, header)
    if clip_norm is not None:
        for _ in range(8):
            norm = _norm(decoded)
            if norm <= clip_norm:
                break
            shrink = clip_norm / norm * (1 - 1e-6)
            target = {k: (v * shrink).astype(np.float32) for k, v in target.items()}
            record = encode(target, header)
            decoded = decode(record, header)
        else:  # pragma: no cover - shrinking converges in one or two steps
            raise RuntimeError("could not fit the compressed update within the clip norm")
    new_residual = (
        {k: (values[k] - decoded[k]).astype(np.float32) for k in keys} if feedback else None
    )
    return Compressed(record, decoded, new_residual)


def _norm(state: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(
        math.fsum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values())
    )


def _clip(state: dict[str, np.ndarray], clip_norm: float) -> dict[str, np.ndarray]:
    norm = _norm(state)
    if norm <= clip_norm or norm == 0:
        return state
    return {k: v * (clip_norm / norm) for k, v in state.items()}


def encoded_bytes(sizes: Sequence[int], codec: str, block_size: int) -> int:
    """Payload bytes of ``codes`` and ``scales`` for tensors of ``sizes`` values (no headers)."""
    total = int(sum(sizes))
    dtype, length = expected_codes(codec, total)
    payload = length * np.dtype(dtype).itemsize
    if codec in BLOCK_CODECS:
        payload += 4 * block_count(sizes, block_size)
    return payload
