"""Adapter state <-> Flower records, and the keys both sides of the wire share.

One place names every record and metric key, so the ClientApp, the ServerApp and the
strategies cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord

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
    """Pack a whole adapter state for sending; float16 halves the bytes on the wire."""
    dtype = WIRE_DTYPES[wire_dtype]
    return ArrayRecord(
        {key: Array(np.ascontiguousarray(value, dtype=dtype)) for key, value in state.items()}
    )


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
    data = array.data
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


def num_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of the arrays in ``record`` (values plus small per-array headers)."""
    return int(sum(len(array.data) for array in record.values()))
