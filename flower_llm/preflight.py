"""Checks before anything heavy, and how the apps report a mistake the user made.

Is the federation big enough?

A simulation's size (``num-supernodes``) is fixed when it starts, so a run whose
``fed.min-available-clients`` or ``fed.min-train-clients`` exceeds it would wait for
nodes forever; it fails at once instead, with both numbers. A deployment's nodes come
and go, so there the ServerApp waits as Flower does.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flower_llm.config import (
    EMBEDDED,
    ConfigError,
    FederationConfig,
    ModelConfig,
    check_federation_size,
)

log = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Any])


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a setting or a file is wrong, not the code: one line suffices."""
    from flower_llm.config import ConfigError
    from flower_llm.data import DataError
    from flower_llm.outputs import RunDirectoryTaken
    from flower_llm.plan import OutOfGpuMemory
    from flower_llm.tasks import TaskFileError
    from flower_llm.updates import InitialAdapterMismatch

    return (
        ConfigError,
        DataError,
        FileNotFoundError,
        RunDirectoryTaken,
        TaskFileError,
        InitialAdapterMismatch,
        OutOfGpuMemory,
    )


def is_simulation(grid: Any) -> bool:
    """Whether ``grid`` (or the grid it wraps) is Flower's in-process simulation grid."""
    inner = getattr(grid, "_grid", grid)
    return type(inner).__name__ == "InMemoryGrid"


def simulated_nodes(grid: Any, *, settle: float = 1.0, limit: float = 20.0) -> int:
    """Number of simulated nodes, once it has not changed for ``settle`` seconds.

    Flower's simulation registers all ``num-supernodes`` nodes together, just after the
    ServerApp thread starts.
    """
    deadline = time.monotonic() + limit
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle:
            break
        time.sleep(0.1)
    return max(count, 0)


def check_simulation_size(grid: Any, fed: FederationConfig) -> None:
    """In a simulation, refuse ``fed.min-*`` above ``num-supernodes`` (ConfigError)."""
    if not is_simulation(grid):
        return
    check_federation_size(fed, simulated_nodes(grid), "num-supernodes of this simulation")


def check_model_reachable(model: ModelConfig) -> None:
    """Refuse a ``model.name`` that cannot load here, before transformers retries and fails.

    A path must exist; a hub id must be in the local Hugging Face cache when the hub is
    off (``HF_HUB_OFFLINE=1``, as ``scripts/flwr-env.sh`` sets).
    """
    import os
    from pathlib import Path

    name = model.name
    if name == EMBEDDED or Path(name).expanduser().is_dir():
        return
    if name.startswith(("/", ".", "~")):
        raise ConfigError(f"run-config 'model.name' = {name!r}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ConfigError(
            f"run-config 'model.name' = {name!r} is not a local directory and not in the "
            "local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloads: download it "
            f"where the hub is reachable (huggingface-cli download {name}) or give a "
            'directory, or use model.name = "embedded"'
        )


def server_fails_loud(main: Handler) -> Handler:
    """Wrap a ServerApp main: a user's mistake is one ERROR line, the traceback DEBUG.

    The run still ends failed (Flower records ``finished:failed``): the mistake is raised
    again as :class:`~flower_llm.outputs.RunFailed` without the chain of frames behind it.
    """
    from flower_llm.outputs import RunFailed

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except user_errors() as err:
            log.error("Run FAILED: %s", err)
            log.debug("where it was raised", exc_info=True)
            raise RunFailed(f"{type(err).__name__}: {err}") from None

    return wrapped  # type: ignore[return-value]


def client_fails_loud(handler: Handler) -> Handler:
    """Wrap a ClientApp handler: a user's mistake becomes an error reply, not a traceback.

    The reply's reason (``DataError: ... the file is empty``) reaches the server, which
    records it as the site's drop reason and stops the run when every site failed so.
    """

    @functools.wraps(handler)
    def wrapped(msg: Any, context: Any) -> Any:
        try:
            return handler(msg, context)
        except user_errors() as err:
            from flwr.app import Error, Message
            from flwr.common.constant import ErrorCode

            log.error("%s", err)
            log.debug("where it was raised", exc_info=True)
            reason = f"{type(err).__name__}: {err}"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)

    return wrapped  # type: ignore[return-value]
