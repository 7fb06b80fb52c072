"""Adapter state <-> Flower records, and the keys both sides of the wire share.

One place names every record and metric key, so the ClientApp, the ServerApp and the
strategies cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from flower_llm.adapters import AdapterState

# Record names inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
LOCAL_ONLY_ARRAYS = "local-only-arrays"

# Metric keys in replies.
NUM_EXAMPLES = "num-examples"
NUM_TOKENS = "num-tokens"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_PERPLEXITY = "eval-perplexity"
EVAL_TOKEN_ACCURACY = "eval-token-accuracy"
EVAL_TOKENS = "eval-tokens"
TRAIN_SECONDS = "train-seconds"
# Sample-level epsilon of a site under DP-SGD; the server keeps the maximum, never a mean.
DPSGD_EPSILON = "dpsgd-epsilon"

# Config keys in instructions.
SERVER_ROUND = "server-round"
LEARNING_RATE = "learning-rate"
SEND_LOCAL_ONLY = "send-local-only"
# client-fixed DP-FedAvg: the L2 bound a client must clip its update to before replying.
CLIP_NORM = "clip-norm"

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


def to_array_record(state: Mapping[str, np.ndarray], wire_dtype: str = "float32") -> ArrayRecord:
    """Pack an adapter state for sending; float16 halves the bytes on the wire."""
    dtype = WIRE_DTYPES[wire_dtype]
    return ArrayRecord(
        {key: Array(np.ascontiguousarray(value, dtype=dtype)) for key, value in state.items()}
    )


def from_array_record(record: ArrayRecord) -> AdapterState:
    """Unpack to float32 arrays, whatever float dtype was sent."""
    state: AdapterState = {}
    for key, array in record.items():
        values = array.numpy()
        if not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"array '{key}' has dtype {values.dtype}, expected a float type")
        state[key] = values.astype(np.float32, copy=False)
    return state


def num_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of the arrays in ``record`` (values plus small per-array headers)."""
    return int(sum(len(array.data) for array in record.values()))
