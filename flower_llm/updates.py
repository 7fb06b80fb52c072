"""Updates on the wire, both directions, with error feedback (``fed.wire-dtype`` bfloat16,
int8 or nf4).

Down (:class:`Downlink`, the server): the global adapter has a version (the round that
made it, 0 for the initial one) and a :func:`~flower_llm.compression.digest`. Each site is
sent, according to what its last reply said it holds:

- ``same`` (no arrays) when it holds the current version (it evaluated it);
- the compressed global update ``Q(G_v - G_{v-1} + e)`` when it holds ``v - 1``;
- the whole adapter in float32 otherwise (first contact, a site that missed rounds, a
  site that lost what it held).

The server checkpoint keeps what each node holds, the last update and the residual
(:meth:`Downlink.state_dict`, :meth:`Downlink.state_arrays`), and a site keeps the global
adapter it holds in its site-state store as well as in its session: a resumed run (a new
Flower run, empty sessions) sends updates again, not whole adapters. The digest check
stays the guard: a site that does not hold what the server believes refuses the message,
its error reply makes the server forget what it held, and it gets the whole adapter in
its next round.

Initial (:class:`InitialRecipe`, :func:`rebuild_initial`): while the global adapter is
still the run's seeded initial one (A from ``seed``, B zero: :func:`flower_llm.adapters.
seeded_initial`), a site that does not hold it is sent an ``initial`` message instead of
the arrays, in every ``fed.wire-dtype`` (float32 and float16 too): the site rebuilds the
adapter from the model it trains and the same seed and checks the digest the server
sends. A mismatch (another torch version, other settings) is an error reply naming what
differs (:class:`InitialAdapterMismatch`); the server then sends that site the whole
adapter.

The server's global adapter IS what the sites reconstruct, ``G_v = G_{v-1} + D(Q(...))``
in float32, so both sides hold the same bits; the server's residual ``e`` keeps what
quantization lost and is added to the next round's update (and kept in the checkpoint).

Up (:func:`receive`, :func:`send_update`, the site): the site holds the global adapter in
its session (``context.state``), applies what comes down (checking the digest of the
result), trains, and sends ``Q(u + e)`` with ``u = local - global``; its residual lives in
``context.state`` and in the site-state store (:mod:`flower_llm.site_state`), one file per
round, so a resumed run continues with the residual of the round it resumes from.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from flower_llm import wire
from flower_llm.compression import (
    COMPRESSED_CODECS,
    WIRE_FORMAT,
    Header,
    WireFormatError,
    compress_with_feedback,
    decode,
    digest,
    encode,
)

if TYPE_CHECKING:
    from flower_llm.site_state import SiteStateStore

log = logging.getLogger(__name__)

AdapterState = dict[str, np.ndarray]

#: context.state records of a site.
HELD_GLOBAL = "held-global"
HELD_GLOBAL_META = "held-global-meta"
RESIDUAL = "uplink-residual"
RESIDUAL_META = "uplink-residual-meta"
HELD_GLOBAL_FILE = "held-global.npz"
"""The site-state store's copy of the global adapter a site holds (its version and
digest in ``__version__`` and ``__digest__``)."""
_RESIDUAL_FILE = re.compile(r"^uplink-residual-(\d{6})\.npz$")
KEEP_RESIDUAL_FILES = 2
"""Residual files a site keeps: the server resumes at most one round back."""
LAST_UPDATE_PREFIX = "last-update/"
"""Checkpoint-tensor prefix of the downlink's last update (:meth:`Downlink.state_arrays`)."""


# --------------------------------------------------------------------------------------
# The server's side: what goes down
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A global adapter version and its digest."""

    version: int
    digest: str


class Downlink:
    """The global adapter as sites reconstruct it, the last update, who holds what.

    Parameters
    ----------
    codec : str
        ``bfloat16``, ``int8`` or ``nf4``.
    block_size : int
        Values per scale (``fed.wire-block-size``).
    feedback : bool
        Keep an error-feedback residual (``fed.error-feedback``).
    """

    def __init__(self, codec: str, block_size: int, feedback: bool) -> None:
        self.codec = codec
        self.block_size = block_size
        self.feedback = feedback
        self.global_state: AdapterState | None = None
        self.held: Held = Held(-1, "")
        self.residual: AdapterState | None = None
        self.update: tuple[ArrayRecord, Header] | None = None
        """The last global update (from ``version - 1`` to ``version``)."""
        self.holds: dict[int, Held] = {}
        """node id -> what its last reply said it holds."""
        self._whole: tuple[Held, ArrayRecord, ConfigRecord] | None = None
        """The whole current adapter, encoded once per version."""
        self._resumed: Held | None = None
        """The version and digest a checkpoint says the global adapter has."""

    @property
    def version(self) -> int:
        """Version of the current global adapter."""
        return self.held.version

    def start(self, state: Mapping[str, np.ndarray], version: int) -> None:
        """Adopt ``state`` as global version ``version`` (first round, or a resume).

        After :meth:`load_state`, the checkpoint's version is kept when ``state`` has its
        digest; otherwise what the checkpoint said about nodes is forgotten (they get
        whole adapters).
        """
        if self.global_state is not None:
            return
        self.global_state = {k: np.array(v, np.float32) for k, v in state.items()}
        self.held = Held(version, digest(self.global_state))
        resumed, self._resumed = self._resumed, None
        if resumed is None:
            return
        if resumed.digest == self.held.digest:
            self.held = resumed
        else:
            log.warning(
                "The resumed global adapter does not match the checkpoint's downlink digest; "
                "every site is sent the whole adapter"
            )
            self.holds.clear()
            self.update = None

    def holds_current(self, node: int) -> bool:
        """Whether ``node``'s last reply said it holds the current global version."""
        return self.holds.get(node) == self.held

    def payload(self, node: int) -> tuple[ArrayRecord, ConfigRecord]:
        """What node ``node`` is sent: nothing new, the last update, or the whole adapter."""
        assert self.global_state is not None, "start() first"
        held = self.holds.get(node)
        if held == self.held:
            header = Header(self.codec, self.block_size, "same", (), self.version, self.held.digest)
            return ArrayRecord(), header.to_record()
        if self.update is not None:
            record, header = self.update
            if held == Held(header.base_version, header.base_digest):
                return record, header.to_record()
        if self._whole is None or self._whole[0] != self.held:
            header = Header(
                "float32",
                self.block_size,
                "adapter",
                tuple(self.global_state),
                self.version,
                self.held.digest,
            )
            self._whole = (self.held, encode(self.global_state, header), header.to_record())
        return self._whole[1], self._whole[2]

    def commit(self, new_state: Mapping[str, np.ndarray], keys: Sequence[str]) -> AdapterState:
        """Send ``new_state`` as an update of ``keys``; return the global adapter the sites
        will reconstruct (which becomes this one's).

        Keys not in ``keys`` (the frozen A under ``ffa``) keep their values.
        """
        assert self.global_state is not None, "start() first"
        previous = self.global_state
        true_update = {
            k: np.asarray(new_state[k], np.float64) - previous[k].astype(np.float64) for k in keys
        }
        header = Header(
            self.codec,
            self.block_size,
            "update",
            tuple(keys),
            self.version + 1,
            "",
            base_version=self.version,
            base_digest=self.held.digest,
        )
        sent = compress_with_feedback(true_update, self.residual, header, feedback=self.feedback)
        self.residual = sent.residual
        reconstructed = dict(previous)
        for key in keys:
            reconstructed[key] = previous[key] + sent.decoded[key]
        new_digest = digest(reconstructed)
        header = Header(
            header.codec,
            header.block_size,
            "update",
            header.keys,
            header.global_version,
            new_digest,
            header.base_version,
            header.base_digest,
        )
        self.update = (sent.record, header)
        self.global_state = reconstructed
        self.held = Held(header.global_version, new_digest)
        return reconstructed

    def note(self, node: int, record: ConfigRecord | None) -> None:
        """Remember what a reply's header says ``node`` holds (forget it without one)."""
        if record is None:
            self.holds.pop(node, None)
            return
        try:
            header = Header.from_record(record)
        except WireFormatError:
            self.holds.pop(node, None)
            return
        self.holds[node] = Held(header.global_version, header.global_digest)

    # --- checkpoint ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the version, what each node holds, the last update's header
        (the residual and the update's arrays go in :meth:`state_arrays`)."""
        last = dict(self.update[1].to_record()) if self.update is not None else None
        return {
            "codec": self.codec,
            "version": self.version,
            "digest": self.held.digest,
            "residual": self.residual is not None,
            # JSON keys are strings; Flower node ids are 64-bit integers
            "holds": {str(n): [h.version, h.digest] for n, h in sorted(self.holds.items())},
            "last-update": last,
        }

    def state_arrays(self) -> AdapterState:
        """The server's residual (under the adapter's keys) and the last update's arrays
        (under ``last-update/``), for the checkpoint's tensors."""
        out = dict(self.residual or {})
        if self.update is not None:
            for name, array in self.update[0].items():
                out[LAST_UPDATE_PREFIX + name] = array.numpy()
        return out

    def load_state(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Continue from a checkpoint: the residual, what each node holds, the last update.

        A checkpoint written before nodes were kept (no ``holds``) continues with every
        site sent the whole adapter.
        """
        if state.get("codec") != self.codec:
            raise ValueError(
                f"checkpoint downlink codec {state.get('codec')!r}, not {self.codec!r}"
            )
        residual = {k: v for k, v in arrays.items() if not k.startswith(LAST_UPDATE_PREFIX)}
        self.residual = (
            {k: np.array(v, np.float32) for k, v in residual.items()} if state["residual"] else None
        )
        self._resumed = Held(int(state["version"]), str(state["digest"]))
        self.holds = {
            int(node): Held(int(version), str(held_digest))
            for node, (version, held_digest) in state.get("holds", {}).items()
        }
        self.update = None
        last = state.get("last-update")
        if last is not None:
            header = Header.from_record(ConfigRecord(dict(last)))
            record = ArrayRecord(
                {
                    k[len(LAST_UPDATE_PREFIX) :]: Array(np.ascontiguousarray(v))
                    for k, v in arrays.items()
                    if k.startswith(LAST_UPDATE_PREFIX)
                }
            )
            decode(record, header)  # a damaged checkpoint fails here, not at a site
            self.update = (record, header)


# --------------------------------------------------------------------------------------
# The site's side
# --------------------------------------------------------------------------------------


def is_compressed(content: RecordDict) -> bool:
    """Whether a message uses the compressed layout (it carries a header)."""
    return WIRE_FORMAT in content.config_records


def receive(
    node_state: RecordDict,
    content: RecordDict,
    store: SiteStateStore | None = None,
    initial: InitialBuilder | None = None,
) -> tuple[AdapterState, Header | None]:
    """The global adapter a message carries, and its header (None: a plain adapter).

    A compressed message updates the global adapter the site holds in ``node_state``;
    with a ``store``, the site also keeps it there, and a session that holds none (a new
    Flower run resuming this one) starts from the store's copy. An ``initial`` message is
    rebuilt by ``initial`` (:func:`rebuild_initial`); in a float32 or float16 run it
    stands for a plain adapter (the header returned is None).

    Raises
    ------
    WireFormatError
        The message cannot be decoded, or is an update (or ``same``) of a version this
        site does not hold; the error reply tells the server, which then sends the whole
        adapter.
    InitialAdapterMismatch
        The initial adapter this site rebuilds is not the server's (the reason names
        what differs).
    """
    if not is_compressed(content):
        return wire.from_array_record(content.array_records[wire.ARRAYS]), None
    header = Header.from_record(content.config_records[WIRE_FORMAT])
    if header.content == "initial":
        state = rebuild_initial(content, header, initial)
        if header.codec not in COMPRESSED_CODECS:
            return state, None  # a float32 / float16 run: no versions to keep
    else:
        state = _reconstruct(node_state, content, header, store)
    node_state[HELD_GLOBAL] = wire.to_array_record(state)
    node_state[HELD_GLOBAL_META] = ConfigRecord(
        {"version": header.global_version, "digest": header.global_digest}
    )
    if store is not None and header.content != "same":
        save_held_global(store, state, Held(header.global_version, header.global_digest))
    return state, header


def _reconstruct(
    node_state: RecordDict, content: RecordDict, header: Header, store: SiteStateStore | None
) -> AdapterState:
    """The global adapter an ``adapter``, ``update`` or ``same`` message stands for."""
    arrays = content.array_records.get(wire.ARRAYS, ArrayRecord())
    if header.content != "adapter" and HELD_GLOBAL_META not in node_state.config_records:
        load_held_global(node_state, store)
    held_meta = node_state.config_records.get(HELD_GLOBAL_META)
    held = (
        Held(int(held_meta["version"]), str(held_meta["digest"]))  # type: ignore[arg-type]
        if held_meta is not None
        else None
    )
    if header.content == "adapter":
        state = decode(arrays, header)
    else:
        wanted = (
            Held(header.global_version, header.global_digest)
            if header.content == "same"
            else Held(header.base_version, header.base_digest)
        )
        if held != wanted or HELD_GLOBAL not in node_state.array_records:
            raise WireFormatError(
                f"a '{header.content}' message for global version {wanted.version}, but this "
                f"site holds {'none' if held is None else held.version}"
            )
        state = wire.from_array_record(node_state.array_records[HELD_GLOBAL])
        if header.content == "update":
            decoded = decode(arrays, header)
            for key, value in decoded.items():
                if key not in state or state[key].shape != value.shape:
                    raise WireFormatError(f"update of '{key}' does not fit the held adapter")
                state[key] = state[key] + value
    if digest(state) != header.global_digest:
        raise WireFormatError(
            f"the reconstructed global version {header.global_version} does not match its "
            "digest (a lost or reordered message)"
        )
    return state


# --------------------------------------------------------------------------------------
# The initial adapter, rebuilt at the site
# --------------------------------------------------------------------------------------


class InitialAdapterMismatch(WireFormatError):
    """The initial adapter a site rebuilds is not the server's; the message names why."""


def torch_version() -> str:
    """The installed torch's version (its generator draws the initial A), without
    importing torch."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - torch is a dependency
        return "none"


@dataclass(frozen=True)
class InitialRecipe:
    """What the run's initial adapter is made of: the :data:`flower_llm.wire.INITIAL`
    record of an ``initial`` message, and what a site compares with its own to name a
    mismatch."""

    seed: int
    tensors: int
    parameters: int
    torch: str

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray], seed: int) -> InitialRecipe:
        """The recipe of ``state`` (the initial adapter as it travels) drawn from ``seed``."""
        parameters = int(sum(np.asarray(v).size for v in state.values()))
        return cls(seed, len(state), parameters, torch_version())

    def to_record(self) -> ConfigRecord:
        """The recipe as it travels."""
        return ConfigRecord(
            {
                "seed": self.seed,
                "tensors": self.tensors,
                "parameters": self.parameters,
                "torch": self.torch,
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> InitialRecipe:
        """Parse a received recipe."""
        values = [record.get(k) for k in ("seed", "tensors", "parameters")]
        torch = record.get("torch")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values) or not (
            isinstance(torch, str)
        ):
            raise WireFormatError(f"bad '{wire.INITIAL}' record: {dict(record)}")
        seed, tensors, parameters = (int(v) for v in values)  # type: ignore[arg-type]
        return cls(seed, tensors, parameters, torch)

    def differences(self, server: InitialRecipe) -> list[str]:
        """What differs between this site's recipe and the server's, in words."""
        return [
            f"{name} {mine} at this site, {theirs} at the server"
            for name, mine, theirs in (
                ("seed", self.seed, server.seed),
                ("adapter tensors", self.tensors, server.tensors),
                ("adapter parameters", self.parameters, server.parameters),
                ("torch", self.torch, server.torch),
            )
            if mine != theirs
        ]


InitialBuilder = Callable[[], tuple[AdapterState, InitialRecipe]]
"""A site's rebuild of the initial global adapter (the part that travels, float32) and
its recipe."""


def initial_message(codec: str, block_size: int, held: Held, recipe: InitialRecipe) -> RecordDict:
    """The records of an ``initial`` instruction (no arrays; the caller adds the config).

    ``codec`` is the run's ``fed.wire-dtype``; ``held`` the initial adapter's version (0)
    and digest as the server holds it (rounded to float16 in a float16 run).
    """
    header = Header(codec, block_size, "initial", (), held.version, held.digest)
    return RecordDict(
        {
            wire.ARRAYS: ArrayRecord(),
            WIRE_FORMAT: header.to_record(),
            wire.INITIAL: recipe.to_record(),
        }
    )


def rebuild_initial(
    content: RecordDict, header: Header, initial: InitialBuilder | None
) -> AdapterState:
    """The initial global adapter an ``initial`` message stands for, rebuilt here and
    checked against the message's digest.

    Raises
    ------
    InitialAdapterMismatch
        No way to rebuild it here, or the rebuilt adapter's digest is not the server's;
        the reason names the differences of the recipes (seed, sizes, torch version).
    """
    if initial is None:
        raise InitialAdapterMismatch("this site cannot rebuild the initial adapter")
    record = content.config_records.get(wire.INITIAL)
    if record is None:
        raise WireFormatError(f"an 'initial' message without its '{wire.INITIAL}' record")
    server = InitialRecipe.from_record(record)
    state, mine = initial()
    if header.codec == "float16":  # the server holds (and would send) it in float16
        state = {k: v.astype(np.float16).astype(np.float32) for k, v in state.items()}
    rebuilt = digest(state)
    if rebuilt != header.global_digest:
        differences = mine.differences(server) or [
            "same seed, sizes and torch version, other values (other LoRA or model settings)"
        ]
        raise InitialAdapterMismatch(
            f"the initial adapter rebuilt at this site (digest {rebuilt}) is not the "
            f"server's (digest {header.global_digest}): {'; '.join(differences)}; the "
            "server sends this site the whole adapter instead"
        )
    return state


def save_held_global(store: SiteStateStore, state: Mapping[str, np.ndarray], held: Held) -> None:
    """Keep the global adapter a site holds in its store (one file, replaced atomically)."""
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {
        "__version__": np.int64(held.version),
        "__digest__": np.array(held.digest),
        **{k: np.asarray(v, np.float32) for k, v in state.items()},
    }
    np.savez(buffer, **arrays)
    store.write_bytes(HELD_GLOBAL_FILE, buffer.getvalue())


def load_held_global(node_state: RecordDict, store: SiteStateStore | None) -> bool:
    """Put the store's copy of the held global adapter in ``node_state``; False: none.

    Its digest is not trusted here: :func:`receive` checks the adapter it reconstructs
    against the digest the server sends, so a stale or damaged copy is refused there.
    """
    payload = store.read_bytes(HELD_GLOBAL_FILE) if store is not None else None
    if payload is None:
        return False
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            held = Held(int(data["__version__"]), str(data["__digest__"]))
            state = {
                k: np.array(data[k], np.float32)
                for k in data.files
                if k not in ("__version__", "__digest__")
            }
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
        log.warning("Ignoring the held global adapter in %s: %s", store.directory, err)  # type: ignore[union-attr]
        return False
    node_state[HELD_GLOBAL] = wire.to_array_record(state)
    node_state[HELD_GLOBAL_META] = ConfigRecord({"version": held.version, "digest": held.digest})
    return True


def holds_record(node_state: RecordDict, received: Header) -> ConfigRecord:
    """A reply's header: this site now holds the global version ``received`` made."""
    meta = node_state.config_records[HELD_GLOBAL_META]
    version, held_digest = meta["version"], meta["digest"]
    assert isinstance(version, int) and isinstance(held_digest, str)
    header = Header(received.codec, received.block_size, "same", (), version, held_digest)
    return header.to_record()


@dataclass(frozen=True)
class UplinkSettings:
    """How a site sends its update."""

    codec: str
    block_size: int
    feedback: bool
    run_id: int
    resume: bool
    """``output.resume``: a residual kept by an earlier Flower run continues."""


def send_update(
    node_state: RecordDict,
    store: SiteStateStore | None,
    settings: UplinkSettings,
    local: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    received: Header,
    server_round: int,
    clip_norm: float | None = None,
) -> tuple[ArrayRecord, ConfigRecord]:
    """The reply's arrays and header: ``Q(local - base + e)`` over ``local``'s keys.

    ``base`` is the global adapter the site trained from (at its own rank); the residual
    of the latest earlier round is taken from ``node_state`` or else ``store``, and the
    new one is written to both.
    """
    keys = tuple(local)
    update = {k: np.asarray(local[k], np.float64) - np.asarray(base[k], np.float64) for k in keys}
    residual = (
        load_residual(node_state, store, settings, server_round) if settings.feedback else None
    )
    header = Header(
        settings.codec,
        settings.block_size,
        "update",
        keys,
        received.global_version,
        received.global_digest,
    )
    sent = compress_with_feedback(
        update, residual, header, feedback=settings.feedback, clip_norm=clip_norm
    )
    if sent.residual is not None:
        save_residual(node_state, store, settings, server_round, sent.residual)
    return sent.record, header.to_record()


def load_residual(
    node_state: RecordDict,
    store: SiteStateStore | None,
    settings: UplinkSettings,
    server_round: int,
) -> AdapterState | None:
    """The residual of the latest round before ``server_round`` (None: none kept)."""
    meta = node_state.config_records.get(RESIDUAL_META)
    if meta is not None and int(meta["round"]) < server_round:  # type: ignore[arg-type]
        return wire.from_array_record(node_state.array_records[RESIDUAL])
    if store is None:
        return None
    rounds = sorted(r for r in _residual_rounds(store) if r < server_round)
    if not rounds:
        return None
    payload = store.read_bytes(_residual_name(rounds[-1]))
    if payload is None:
        return None
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        run_id = int(data["__run_id__"])
        if run_id != settings.run_id and not settings.resume:
            log.warning(
                "Uplink residual in %s was written by run %d; this is a new run of the same "
                "name, so it starts without one",
                store.directory,
                run_id,
            )
            return None
        return {k: np.array(data[k], np.float32) for k in data.files if k != "__run_id__"}


def save_residual(
    node_state: RecordDict,
    store: SiteStateStore | None,
    settings: UplinkSettings,
    server_round: int,
    residual: Mapping[str, np.ndarray],
) -> None:
    """Keep ``residual`` (of ``server_round``) in the session and in the store."""
    node_state[RESIDUAL] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v, np.float32)) for k, v in residual.items()}
    )
    node_state[RESIDUAL_META] = ConfigRecord({"round": server_round})
    if store is None:
        return
    buffer = io.BytesIO()
    # Flower run ids are unsigned 64-bit integers.
    arrays: dict[str, Any] = {"__run_id__": np.uint64(settings.run_id), **residual}
    np.savez(buffer, **arrays)
    store.write_bytes(_residual_name(server_round), buffer.getvalue())
    for old in sorted(_residual_rounds(store))[:-KEEP_RESIDUAL_FILES]:
        (store.directory / _residual_name(old)).unlink(missing_ok=True)


def _residual_name(server_round: int) -> str:
    return f"uplink-residual-{server_round:06d}.npz"


def _residual_rounds(store: SiteStateStore) -> list[int]:
    if not store.directory.is_dir():
        return []
    found = (_RESIDUAL_FILE.match(p.name) for p in store.directory.iterdir())
    return [int(m.group(1)) for m in found if m]
