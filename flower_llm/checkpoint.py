"""Full-state checkpoints of a federated run, so that a stopped server can continue.

After every round the server writes ``<run dir>/checkpoint.safetensors``: the global
adapter as safetensors arrays, and in the file's metadata one JSON blob with everything
else a continuation needs:

- ``round``: rounds completed, and whether the run had decided to stop there (a
  privacy budget, say);
- ``strategy``: whatever the strategy returns from ``state_dict()`` (DP-FedAvg's
  accountant, clip norm and noise RNG; server-optimizer moments of another strategy);
- ``extra``: a free ``dict[str, Any]`` for any other owner of run state;
- ``rng``: the run's random streams (train sampling, eval sampling, DP noise:
  :mod:`flower_llm.streams`), and Python's and numpy's global states;
- ``metrics``: every metrics.jsonl row so far;
- ``config``: the run-config, flat, to refuse a continuation under different maths.

The file is replaced atomically (uniquely named temporary file, fsync, ``os.replace``): a
crash while writing leaves the previous checkpoint whole. A digest over the adapter bytes and the
JSON catches a damaged file, which is refused with its path named, never half-loaded.

A checkpoint holds the DP noise generator's state when DP is on: anyone who reads it can
predict future noise. Keep it as private as the clients' individual updates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.app import Array, ArrayRecord

from flower_llm.config import SECTIONS, RunConfig, Scalar
from flower_llm.outputs import METRICS_FILE, write_text_atomic
from flower_llm.streams import RandomStreams

CHECKPOINT_FILE = "checkpoint.safetensors"
STRATEGY_PREFIX = "strategy/"
"""Tensor-name prefix of the strategy's arrays (:meth:`state_arrays`)."""
FORMAT = "flower-llm/checkpoint"
VERSION = 1

#: Run-config keys that may differ between a checkpoint and the run that continues it:
#: where outputs go, and how long or for how many clients the server waits. Every other
#: key changes what the rounds compute (the model, adapters, data, local training, the
#: aggregation, DP, the seed) and must match.
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "fed.round-timeout",
        "fed.min-train-clients",
        "fed.min-evaluate-clients",
        "fed.min-available-clients",
        "fed.fraction-evaluate",
        "fed.evaluate-every",
        "secagg.timeout",
        # Only the end-of-run fine-tune of fed.personalization = finetune reads these;
        # no round does, so a resumed run's rounds are the same whatever they hold.
        "personal.local-steps",
        "personal.learning-rate",
    }
)

#: Why a key that must match does: added to its mismatch message where the reason is not
#: plain from the key's name.
WHY_FIXED_ON_RESUME = {
    "fed.personalization": (
        "it decides what the server averages (the whole adapter, or the A matrices alone) "
        "and what each site keeps (its own B), so the checkpoint's global adapter and the "
        "sites' kept state belong to the other mode"
    ),
}
MAY_CHANGE_PREFIXES = ("output.", "eval.")  # what is written and asked, not trained


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or belongs to a different run."""


@runtime_checkable
class Stateful(Protocol):
    """A strategy (or wrapper) with state that must survive a restart."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        ...


@dataclass
class Checkpoint:
    """Everything needed to continue a run after ``server_round``."""

    server_round: int
    """Rounds completed."""
    adapter: dict[str, np.ndarray]
    """The global adapter after ``server_round``, in the dtype it travels in."""
    config: dict[str, Scalar]
    """The flat run-config of the run that wrote it (:func:`flat_config`)."""
    strategy: dict[str, Any] = field(default_factory=dict)
    """The strategy's ``state_dict()`` (empty for a stateless strategy)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """JSON-able state of any other owner (an accountant kept outside the strategy...)."""
    rng: dict[str, Any] = field(default_factory=dict)
    """Python ``random`` and numpy global RNG states (:func:`capture_rng`)."""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """The metrics.jsonl rows of rounds ``1 .. server_round``."""
    stopped: bool = False
    """Whether the run had decided to stop after ``server_round`` (e.g. privacy budget)."""
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """Arrays of the strategy's state (a compressed downlink's error-feedback residual),
    stored as tensors ``strategy/<key>`` next to the adapter's."""


# --------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------


def checkpoint_path(run_dir: str | Path) -> Path:
    """Where a run directory keeps its checkpoint."""
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; return the path.

    The bytes go to a temporary file in the same directory, which is flushed to disk and
    then renamed over ``path``: readers (and a restart after a crash at any point) see
    either the previous checkpoint or this one, never a mixture.
    """
    from safetensors.numpy import save as safetensors_bytes

    path = Path(path)
    keys = list(checkpoint.adapter)
    # safetensors wants C-contiguous arrays; it stores them sorted, so keep the order.
    tensors = {k: np.ascontiguousarray(checkpoint.adapter[k]) for k in keys}
    strategy_keys = [STRATEGY_PREFIX + k for k in checkpoint.strategy_arrays]
    for key in checkpoint.strategy_arrays:
        tensors[STRATEGY_PREFIX + key] = np.ascontiguousarray(checkpoint.strategy_arrays[key])
    state = {
        "round": int(checkpoint.server_round),
        "stopped": bool(checkpoint.stopped),
        "adapter-keys": keys,
        "strategy-array-keys": strategy_keys,
        "config": checkpoint.config,
        "strategy": checkpoint.strategy,
        "extra": checkpoint.extra,
        "rng": checkpoint.rng,
        "metrics": checkpoint.metrics,
    }
    state_json = json.dumps(state, sort_keys=True, default=_json_default)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "state": state_json,
        "sha256": _digest(state_json, tensors, keys + strategy_keys),
    }
    data = safetensors_bytes(tensors, metadata=metadata)

    # Owner-only (mkstemp's mode): with DP on, the file holds the noise generator's state.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable: without it, a power cut can bring back the old file.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        The file is missing, truncated, corrupt, or not a checkpoint of this version; the
        message names the file.
    """
    from safetensors.numpy import load as safetensors_load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    try:
        metadata = _safetensors_metadata(data)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {metadata.get('format')!r})")
        if metadata.get("version") != str(VERSION):
            raise ValueError(f"version {metadata.get('version')!r}, expected {VERSION}")
        state_json = metadata["state"]
        state = json.loads(state_json)
        keys = list(state["adapter-keys"])
        strategy_keys = list(state.get("strategy-array-keys", []))
        loaded = safetensors_load(data)
        if set(loaded) != set(keys) | set(strategy_keys):
            raise ValueError("the adapter arrays do not match the recorded keys")
        if _digest(state_json, loaded, keys + strategy_keys) != metadata.get("sha256"):
            raise ValueError("checksum mismatch: the file was damaged after it was written")
        return Checkpoint(
            server_round=int(state["round"]),
            adapter={k: loaded[k] for k in keys},
            config=dict(state["config"]),
            strategy=dict(state["strategy"]),
            extra=dict(state["extra"]),
            rng=dict(state["rng"]),
            metrics=list(state["metrics"]),
            stopped=bool(state["stopped"]),
            strategy_arrays={k[len(STRATEGY_PREFIX) :]: loaded[k] for k in strategy_keys},
        )
    except CheckpointError:
        raise
    except Exception as err:  # safetensors, json and struct each raise their own types
        raise CheckpointError(
            f"checkpoint {path} is corrupt or incomplete ({type(err).__name__}: {err}); "
            "restore it from a backup, or start the run again with output.resume = false "
            "(into a new output.run-name)"
        ) from err


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: 8-byte length, then a JSON header."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"header of {header_len} bytes but the file has {len(data)}")
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise ValueError("no metadata in the safetensors header")
    return metadata


def _digest(state_json: str, tensors: Mapping[str, np.ndarray], keys: list[str]) -> str:
    sha = hashlib.sha256(state_json.encode())
    for key in keys:
        value = np.ascontiguousarray(tensors[key])
        sha.update(f"{key}|{value.dtype.str}|{value.shape}".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"checkpoint state is not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------------------
# The pieces of run state
# --------------------------------------------------------------------------------------


def flat_config(cfg: RunConfig) -> dict[str, Scalar]:
    """``cfg`` as Flower's flat run-config (``{"lora.r": 16, ...}``)."""
    flat: dict[str, Scalar] = {}
    for section_name, section in SECTIONS:
        values = getattr(cfg, section_name)
        for f in dataclasses.fields(section):
            flat[f.metadata["key"]] = getattr(values, f.name)
    for f in dataclasses.fields(RunConfig):
        if "key" in f.metadata:
            flat[f.metadata["key"]] = getattr(cfg, f.name)
    return flat


def config_mismatches(saved: Mapping[str, Scalar], cfg: RunConfig) -> list[str]:
    """Settings that differ from the checkpoint's in ways that change the rounds' maths.

    Returns
    -------
    list[str]
        ``"<key>: checkpoint <old>, now <new>"`` for each offending key, sorted; empty if
        the run may continue. ``fed.num-rounds`` may change only with a constant learning
        rate (the cosine and linear schedules depend on it).
    """
    now = flat_config(cfg)
    defaults = flat_config(RunConfig())
    problems = []
    for key in sorted(set(now) | set(saved)):
        if key in MAY_CHANGE_ON_RESUME or key.startswith(MAY_CHANGE_PREFIXES):
            continue
        if key == "fed.num-rounds" and now.get("train.lr-schedule") == "constant":
            continue
        # A key added to the code after the checkpoint was written matches at its default.
        old = saved.get(key, defaults.get(key))
        new = now.get(key, defaults.get(key))
        if old != new:
            why = WHY_FIXED_ON_RESUME.get(key)
            problems.append(
                f"{key}: checkpoint {old!r}, now {new!r}" + (f" ({why})" if why else "")
            )
    return problems


def capture_rng() -> dict[str, Any]:
    """Python's global ``random`` state and numpy's legacy global state, JSON-able."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNGs to a :func:`capture_rng` state (missing parts are left alone)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a Flower ``ArrayRecord``, in order and in their own dtype."""
    return {key: array.numpy() for key, array in record.items()}


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Inverse of :func:`record_to_arrays`: the same arrays, keys and dtypes."""
    return ArrayRecord({key: Array(np.ascontiguousarray(v)) for key, v in arrays.items()})


# --------------------------------------------------------------------------------------
# What a ServerApp calls
# --------------------------------------------------------------------------------------


def write_round_checkpoint(
    run_dir: str | Path,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    strategy: object,
    metrics: list[dict[str, Any]],
    *,
    stopped: bool = False,
    extra: Mapping[str, Any] | None = None,
    streams: RandomStreams | None = None,
) -> Path:
    """Checkpoint the run after ``server_round`` (call it once the round's outputs are saved).

    ``strategy`` contributes its ``state_dict()`` if it has one (:class:`Stateful`);
    ``streams`` the state of every random stream.
    """
    rng = capture_rng()
    if streams is not None:
        rng["streams"] = streams.state_dict()
    return save_checkpoint(
        checkpoint_path(run_dir),
        Checkpoint(
            server_round=server_round,
            adapter=record_to_arrays(arrays),
            config=flat_config(cfg),
            strategy=strategy.state_dict() if isinstance(strategy, Stateful) else {},
            strategy_arrays=dict(getattr(strategy, "state_arrays", dict)()),
            extra=dict(extra or {}),
            rng=rng,
            metrics=list(metrics),
            stopped=stopped,
        ),
    )


def resume_from_checkpoint(
    run_dir: str | Path, cfg: RunConfig, strategy: object, streams: RandomStreams | None = None
) -> Checkpoint:
    """Load the run's checkpoint, check it fits ``cfg``, restore strategy and RNG state.

    ``streams`` continue from the checkpoint's random-stream states.

    The caller continues with round ``checkpoint.server_round + 1`` from
    ``arrays_to_record(checkpoint.adapter)``. metrics.jsonl is rewritten from the
    checkpoint's rows: a crash after a round's row was appended but before its checkpoint
    was written leaves a row that the continuation will write again.

    Raises
    ------
    CheckpointError
        No checkpoint (a resumed run never silently starts over), a damaged one, one
        whose settings differ in keys that change the maths (all of them named), or a
        strategy state the strategy refuses.
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise CheckpointError(
            f"output.resume = true but there is no checkpoint at {path} (the run finished "
            "no round, or output.dir / output.run-name point elsewhere); set "
            "output.resume = false to start a new run"
        )
    checkpoint = load_checkpoint(path)
    problems = config_mismatches(checkpoint.config, cfg)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} was written under different settings, so continuing it "
            "would not be the same run: " + "; ".join(problems)
        )
    if isinstance(strategy, Stateful):
        try:
            strategy.load_state_dict(checkpoint.strategy)
            if hasattr(strategy, "load_state_arrays"):
                strategy.load_state_arrays(checkpoint.strategy_arrays)
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path}: strategy state refused: {err}") from err
    elif checkpoint.strategy:
        raise CheckpointError(
            f"checkpoint {path} holds strategy state but {type(strategy).__name__} has no "
            "load_state_dict to restore it"
        )
    restore_rng(checkpoint.rng)
    if streams is not None:
        if "streams" not in checkpoint.rng:
            raise CheckpointError(f"checkpoint {path} holds no random-stream state")
        try:
            streams.load_state_dict(checkpoint.rng["streams"])
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path}: random streams refused: {err}") from err
    metrics = Path(run_dir) / METRICS_FILE
    write_text_atomic(
        metrics, "".join(json.dumps(row, sort_keys=True) + "\n" for row in checkpoint.metrics)
    )
    return checkpoint
