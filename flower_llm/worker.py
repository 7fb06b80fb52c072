"""The site worker: one long-lived process per site that keeps the model warm.

A SuperNode starts a new ClientApp process for every message; each would import torch,
load the base model and prepare the site's data again. A site worker
(``flower-llm site-worker``) does that once and keeps it: the ClientApp process only
relays the message to it over a local Unix socket and relays the reply back
(:func:`site_worker_mod`, on when the SuperNode's node-config has ``worker-socket``).

The worker runs the project's own ClientApp (``client_apps.qlora.app``) on each message it
receives, with the context the SuperNode gave the relay, and sends back the reply's
content and the context's new state. Every mode therefore works through it unchanged:
plain and client-side-clipped FedAvg, DP-SGD (its accountant lives in the context state),
SecAgg+ (all four stages, with the protocol's state in the context state).

Protocol (version :data:`PROTOCOL_VERSION`), one job per connection::

    frame  = MAGIC (4 bytes) | header length (uint32, big-endian) | header (UTF-8 JSON)
             | blob 1 | blob 2 | ...        (blob lengths listed in header["blobs"])
    request header: {"protocol": 1, "job": "ping" | "run", "flower-llm": <version>,
                     "blobs": [...], and for "run": "task": [run_id, node_id, task_id]}
      "run" blobs:  Flower's protobuf of the Message, then of the Context
    reply header:   {"protocol": 1, "status": "ok" | "error", "error": <text>, "blobs": [...]}
      "run" blobs:  protobuf of the reply's content (RecordDict), then of the new state

Only the client side of this module is imported by the relaying ClientApp: it needs the
standard library and ``flwr`` and never imports torch, transformers or peft. The server
side imports the ClientApp (and, with its first job, the training stack) lazily.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAGIC = b"FLWK"
NODE_CONFIG_KEY = "worker-socket"
"""node-config key naming the site worker's socket; absent: the ClientApp trains itself."""

JOBS = ("ping", "run")
MESSAGE_CATEGORIES = ("train", "evaluate")
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_JOB_BYTES = 2**30
#: The ClientApp a worker runs unless told otherwise: this project's.
DEFAULT_APP = "client_apps.qlora:app"
"""Largest job or reply accepted (1 GiB: an 8B model's adapter is about 160 MiB)."""

_PREFIX = struct.Struct(">4sI")
# A Unix socket path must fit sockaddr_un.sun_path (108 bytes with its NUL on Linux).
MAX_SOCKET_PATH = 107


class WorkerError(RuntimeError):
    """A job the site worker could not run, or a worker that could not be reached."""


def _version() -> str:
    from flower_llm import __version__

    return str(__version__)


# --------------------------------------------------------------------------------------
# Framing (both sides)
# --------------------------------------------------------------------------------------


def send_frame(sock: socket.socket, header: dict[str, Any], blobs: Sequence[bytes] = ()) -> None:
    """Write one frame: the header (with the blob lengths added) and the blobs."""
    header = {**header, "protocol": PROTOCOL_VERSION, "blobs": [len(b) for b in blobs]}
    encoded = json.dumps(header).encode()
    sock.sendall(_PREFIX.pack(MAGIC, len(encoded)) + encoded)
    for blob in blobs:
        if blob:  # the peer may have read everything and closed before an empty send
            sock.sendall(blob)


def _recv_exact(sock: socket.socket, size: int, what: str) -> bytes:
    chunks = []
    left = size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed with {left} of {size} bytes of {what} unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, max_bytes: int) -> tuple[dict[str, Any], list[bytes]]:
    """Read one frame; raise ValueError on anything that is not a valid frame of ours."""
    prefix = _recv_exact(sock, _PREFIX.size, "frame prefix")
    magic, header_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ValueError(f"not a flower-llm worker frame (starts with {magic!r})")
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_recv_exact(sock, header_len, "header"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    if header.get("protocol") != PROTOCOL_VERSION:
        raise ValueError(
            f"protocol version {header.get('protocol')!r}; this side speaks {PROTOCOL_VERSION}"
        )
    sizes = header.get("blobs")
    if not isinstance(sizes, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes
    ):
        raise ValueError(f"header 'blobs' must be a list of byte counts, got {sizes!r}")
    if sum(sizes) > max_bytes:
        raise ValueError(f"{sum(sizes)} bytes of payload exceed the limit of {max_bytes}")
    blobs = [_recv_exact(sock, n, f"blob {i}") for i, n in enumerate(sizes)]
    return header, blobs


def peer_uid(sock: socket.socket) -> int:
    """User id of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


# --------------------------------------------------------------------------------------
# Client side: what the ClientApp process runs (light: stdlib + flwr)
# --------------------------------------------------------------------------------------


def _connect(path: str, connect_timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(connect_timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as err:
        sock.close()
        raise WorkerError(
            f"no site worker listening at {path} (node-config '{NODE_CONFIG_KEY}'): start "
            f"it with `flower-llm site-worker --socket {path}` ({err.strerror})"
        ) from err
    except OSError as err:
        sock.close()
        raise WorkerError(f"cannot connect to the site worker at {path}: {err}") from err
    if peer_uid(sock) != os.getuid():
        sock.close()
        raise WorkerError(f"the process listening at {path} runs as another user: refused")
    sock.settimeout(None)  # a job takes as long as its training does
    return sock


def call_worker(
    path: str,
    header: dict[str, Any],
    blobs: list[bytes],
    *,
    connect_timeout: float = 10.0,
    max_bytes: int = DEFAULT_MAX_JOB_BYTES,
) -> tuple[dict[str, Any], list[bytes]]:
    """Send one job, wait for its reply; raise :class:`WorkerError` if there is none."""
    with _connect(path, connect_timeout) as sock:
        try:
            send_frame(sock, {"flower-llm": _version(), **header}, blobs)
            reply, reply_blobs = recv_frame(sock, max_bytes)
        except (EOFError, ConnectionError) as err:
            raise WorkerError(
                f"the site worker at {path} closed the connection before replying: it died "
                f"or was stopped mid-job ({err})"
            ) from err
        except ValueError as err:
            raise WorkerError(f"invalid reply from the site worker at {path}: {err}") from err
    if reply.get("status") != "ok":
        raise WorkerError(f"site worker at {path}: {reply.get('error', 'unknown error')}")
    return reply, reply_blobs


def ping(path: str, connect_timeout: float = 10.0) -> dict[str, Any]:
    """The worker's status (pid, jobs run, model loads); raises if it does not answer."""
    reply, _ = call_worker(path, {"job": "ping"}, [], connect_timeout=connect_timeout)
    return {k: v for k, v in reply.items() if k not in ("protocol", "blobs", "status")}


def relay(msg: Message, context: Context, path: str) -> Message:
    """Have the site worker at ``path`` handle ``msg``; return its reply as ours.

    ``context.state`` takes the contents the worker's handler left in it, so what a mode
    keeps across rounds (a DP-SGD accountant, SecAgg+ protocol state) stays with the
    SuperNode exactly as without a worker.
    """
    from flwr.common.serde import context_to_proto, message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from flwr.supercore.task_identity import TaskIdentity

    task = [context.run_id, context.node_id, _task_id(TaskIdentity)]
    header = {"job": "run", "task": task, "message-type": msg.metadata.message_type}
    blobs = [
        message_to_proto(msg).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    ]
    _, (content_blob, state_blob) = call_worker(path, header, blobs)
    content, state = ProtoRecordDict(), ProtoRecordDict()
    content.ParseFromString(content_blob)
    state.ParseFromString(state_blob)
    # In place: the SuperNode (or the simulation engine) may hold this very RecordDict.
    new_state = recorddict_from_proto(state)
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in new_state.items():
        context.state[key] = record
    return Message(content=recorddict_from_proto(content), reply_to=msg)


def _task_id(identity: Any) -> int:
    try:
        return int(identity.task_id)
    except RuntimeError:  # not set outside a SuperNode's ClientApp process (tests)
        return 0


def site_worker_mod(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """ClientApp mod: relay to the node-config's ``worker-socket`` if set, else run here."""
    path = context.node_config.get(NODE_CONFIG_KEY)
    if path is None or path == "":
        return call_next(msg, context)
    if not isinstance(path, str):
        raise ValueError(f"node-config '{NODE_CONFIG_KEY}' must be a path string, got {path!r}")
    return relay(msg, context, path)


# --------------------------------------------------------------------------------------
# Server side: the worker process
# --------------------------------------------------------------------------------------


def prepare_socket_dir(path: Path) -> None:
    """Create the socket's directory owner-only (0700), or check that an existing one is.

    The directory is what keeps other users out: connecting needs search permission on
    it. An existing directory owned by someone else or open to group/others is refused,
    since whoever controls it could swap the socket.
    """
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"socket directory {directory} is owned by uid {info.st_uid}")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(
            f"socket directory {directory} has mode {stat.S_IMODE(info.st_mode):o}: it must "
            f"be accessible to its owner only (chmod 700 {directory})"
        )


@dataclass
class WorkerStats:
    """What the worker has done since it started."""

    started: float = field(default_factory=time.time)
    jobs: int = 0
    last_job_seconds: float = 0.0
    failed_jobs: int = 0
    refused: int = 0


class SiteWorker:
    """Runs ClientApp jobs one at a time, on sessions that stay loaded between jobs.

    Parameters
    ----------
    socket_path : str | Path
        Where to listen; its directory is created owner-only (or must be already).
    max_job_bytes : int
        Largest job accepted; bigger ones are refused before they are read.
    busy_timeout : float
        Seconds a job waits for the one before it to finish before it is refused as busy.
    app : str
        The ClientApp the worker runs, as ``module:attribute`` (the way a Flower App's
        pyproject.toml names its ``clientapp``); loaded with the first job.
    """

    def __init__(
        self,
        socket_path: str | Path,
        *,
        max_job_bytes: int = DEFAULT_MAX_JOB_BYTES,
        busy_timeout: float = 30.0,
        app: str = DEFAULT_APP,
    ) -> None:
        self.socket_path = Path(socket_path).absolute()
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"socket path {self.socket_path} is longer than {MAX_SOCKET_PATH} bytes, "
                "the limit of a Unix socket address: choose a shorter one"
            )
        self.max_job_bytes = max_job_bytes
        self.busy_timeout = busy_timeout
        self.app_reference = app
        self._app: Callable[[Message, Context], Message] | None = None
        self.stats = WorkerStats()
        self._job_lock = threading.Lock()
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def bind(self) -> None:
        """Create the owner-only directory and the 0600 socket, and listen."""
        prepare_socket_dir(self.socket_path)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            if self._answers():
                raise RuntimeError(f"a site worker is already listening at {self.socket_path}")
            self.socket_path.unlink()  # left behind by a worker that died
        worker = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                worker.handle_connection(self.request)

        old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
        try:
            server = socketserver.ThreadingUnixStreamServer(str(self.socket_path), Handler)
        finally:
            os.umask(old_umask)
        server.daemon_threads = True
        os.chmod(self.socket_path, 0o600)
        self._server = server

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or a signal that ends the process)."""
        if self._server is None:
            self.bind()
        assert self._server is not None
        log.info("Site worker %d listening on %s", os.getpid(), self.socket_path)
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def shutdown(self) -> None:
        """Stop serving (from another thread)."""
        if self._server is not None:
            self._server.shutdown()

    def close(self) -> None:
        """Close the socket and remove its file."""
        if self._server is not None:
            self._server.server_close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def _answers(self) -> bool:
        try:
            ping(str(self.socket_path), connect_timeout=2.0)
        except WorkerError:
            return False
        return True

    # --- one connection, one job -------------------------------------------------------

    def handle_connection(self, sock: socket.socket) -> None:
        """Check the peer, read and validate one job, run it, reply."""
        if peer_uid(sock) != os.getuid():
            # The 0700 directory already keeps other users out; this holds even if the
            # directory were opened up by mistake.
            self.stats.refused += 1
            log.warning("Refused a connection from uid %d", peer_uid(sock))
            self._reply_error(sock, "connections from other users are refused")
            return
        sock.settimeout(60.0)  # a client that connects and sends nothing is dropped
        try:
            header, blobs = recv_frame(sock, self.max_job_bytes)
            self.validate(header, blobs)
        except (ValueError, EOFError, OSError) as err:
            self.stats.refused += 1
            log.warning("Refused a job: %s", err)
            self._reply_error(sock, f"refused: {err}")
            return
        sock.settimeout(None)
        if header["job"] == "ping":
            send_frame(sock, {"status": "ok", **self.status()})
            return
        if not self._job_lock.acquire(timeout=self.busy_timeout):
            self.stats.refused += 1
            self._reply_error(
                sock, f"busy: another job has been running for over {self.busy_timeout:.0f} s"
            )
            return
        try:
            content, state = self.run_job(header, blobs)
        except Exception as err:  # the job failed: the ClientApp reports it to its server
            self.stats.failed_jobs += 1
            log.exception("Job failed")
            self._reply_error(sock, f"job failed: {type(err).__name__}: {err}")
            return
        finally:
            self._job_lock.release()
        self.stats.jobs += 1
        try:
            send_frame(sock, {"status": "ok"}, [content, state])
        except OSError as err:  # the relay died or gave up; nothing to tell anyone
            log.warning("Could not send a reply: %s", err)

    @staticmethod
    def _reply_error(sock: socket.socket, error: str) -> None:
        with contextlib.suppress(OSError):
            send_frame(sock, {"status": "error", "error": error})

    def validate(self, header: dict[str, Any], blobs: list[bytes]) -> None:
        """Raise ValueError unless ``header``/``blobs`` form a job this worker runs."""
        job = header.get("job")
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}; jobs are {', '.join(JOBS)}")
        if header.get("flower-llm") != _version():
            raise ValueError(
                f"client runs flower-llm {header.get('flower-llm')!r}, this worker "
                f"{_version()}: restart the worker after upgrading"
            )
        if job == "ping":
            if blobs:
                raise ValueError("a ping carries no payload")
            return
        if len(blobs) != 2:
            raise ValueError(f"a run job carries 2 blobs (message, context), got {len(blobs)}")
        task = header.get("task")
        if not (
            isinstance(task, list)
            and len(task) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in task)
        ):
            raise ValueError(f"'task' must be [run_id, node_id, task_id], got {task!r}")
        category = str(header.get("message-type", "")).split(".", 1)[0]
        if category not in MESSAGE_CATEGORIES:
            raise ValueError(
                f"message type {header.get('message-type')!r}: the worker runs "
                f"{' and '.join(MESSAGE_CATEGORIES)} messages only"
            )

    def client_app(self) -> Callable[[Message, Context], Message]:
        """The ClientApp named by ``app`` (a library names no app module itself)."""
        if self._app is None:
            module_name, _, attribute = self.app_reference.partition(":")
            if not module_name or not attribute:
                raise ValueError(f"app {self.app_reference!r} is not 'module:attribute'")
            self._app = getattr(importlib.import_module(module_name), attribute)
        return self._app

    def run_job(self, header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, bytes]:
        """Run the ClientApp on the job's message; return reply content and state (protobuf)."""
        from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage
        from flwr.supercore.task_identity import TaskIdentity

        app = self.client_app()
        proto_msg, proto_ctx = ProtoMessage(), ProtoContext()
        try:
            proto_msg.ParseFromString(blobs[0])
            proto_ctx.ParseFromString(blobs[1])
            msg = message_from_proto(proto_msg)
            context = context_from_proto(proto_ctx)
        except Exception as err:
            raise ValueError(f"message or context does not parse: {err}") from err
        if msg.metadata.message_type != header["message-type"]:
            raise ValueError("the header's message type differs from the message's")
        if msg.has_error():
            raise ValueError("the message carries an error, not content")
        # The worker must run the job itself, not relay it again.
        context.node_config = {k: v for k, v in context.node_config.items() if k != NODE_CONFIG_KEY}
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = header["task"]
        log.info("Running %s for node %d", msg.metadata.message_type, context.node_id)
        started = time.perf_counter()
        reply = app(msg, context)
        if reply.has_error():
            raise RuntimeError(f"the ClientApp replied with an error: {reply.error.reason}")
        self.stats.last_job_seconds = time.perf_counter() - started
        log.info(
            "Ran %s for node %d in %.2f s",
            msg.metadata.message_type,
            context.node_id,
            self.stats.last_job_seconds,
        )
        return (
            recorddict_to_proto(reply.content).SerializeToString(),
            recorddict_to_proto(context.state).SerializeToString(),
        )

    def status(self) -> dict[str, Any]:
        """Pid, uptime, jobs and the session cache's model loads (for ping)."""
        import sys

        loads = 0
        qlora = sys.modules.get("client_apps.qlora")
        if qlora is not None and qlora.sessions.cache_info().currsize:
            loads = qlora.sessions().model_loads
        return {
            "pid": os.getpid(),
            "uptime-s": round(time.time() - self.stats.started, 1),
            "jobs": self.stats.jobs,
            "last-job-s": round(self.stats.last_job_seconds, 4),
            "failed-jobs": self.stats.failed_jobs,
            "refused": self.stats.refused,
            "model-loads": loads,
        }
