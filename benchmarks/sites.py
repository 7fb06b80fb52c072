"""Sites answered in-process by the project's real ClientApp, for benchmarks and tests.

The server side (``server_apps.fedavg.run``) talks to an :class:`AppGrid` as it talks to
Flower's Grid: real Messages and records, real ClientApp handlers and Contexts; only the
transport is left out. Kept here, outside the layered packages (``flower_llm``,
``strategies``, ``client_apps``, ``server_apps``), so that importing it creates no cycle
among them: benchmarks and tests both sit above all four.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def site_contexts(
    run_id: int, run_config: dict[str, Any], site_state: Path, sites: int
) -> list[Any]:
    """Fresh Contexts of ``sites`` sites (node ids 1..sites, partition ids 0..sites-1), as
    Flower gives a new run: empty node state; site state under ``site_state``."""
    from flwr.app import Context, RecordDict

    from flower_llm.site_state import SITE_STATE_DIR_KEY

    return [
        Context(
            run_id=run_id,
            node_id=node + 1,
            node_config={
                "partition-id": node,
                "num-partitions": sites,
                SITE_STATE_DIR_KEY: str(site_state),
            },
            state=RecordDict(),
            run_config=run_config,
        )
        for node in range(sites)
    ]


class AppGrid:
    """``sites`` sites that answer every message with the project's ClientApp.

    Parameters
    ----------
    run_config : dict
        The run-config every site's Context carries.
    site_state : Path
        The root of the sites' state stores (node-config ``site-state-dir``).
    sites : int
        How many sites (node ids 1..sites).
    run_id : int
        The Flower run id the sites see (a resumed run is a new one).
    keep_replies : bool
        Keep every train reply in :attr:`train_replies` (tests inspect them).

    A reply with an error raises ``RuntimeError`` naming the site and the reason: the
    in-process runs this serves expect none.
    """

    def __init__(
        self,
        run_config: dict[str, Any],
        site_state: Path,
        sites: int,
        *,
        run_id: int = 1,
        keep_replies: bool = False,
    ) -> None:
        self.contexts = {c.node_id: c for c in site_contexts(run_id, run_config, site_state, sites)}
        self.keep_replies = keep_replies
        self.train_replies: list[Any] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from client_apps.qlora import app

        replies = []
        for msg in messages:
            reply = app(msg, self.contexts[msg.metadata.dst_node_id])
            if reply.has_error():
                raise RuntimeError(f"site {msg.metadata.dst_node_id}: {reply.error.reason}")
            if self.keep_replies and msg.metadata.message_type == "train":
                self.train_replies.append(reply)
            replies.append(reply)
        return replies
