"""The server's side of personalization: ask every site for its per-site scores.

At the end of a run with ``fed.personalization`` on, each site evaluates its local-only,
global and personal adapters on its own held-out split (:func:`flower_llm.personal.
compare_on_site`) and replies with the scores alone; this module sends the final global
adapter (its A alone under ``local-b``) and gathers the replies into summary.json's
``per-site`` table.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flower_llm import wire
from flower_llm.aggregation import metric_problem
from flower_llm.outputs import site_name, unique_site_names
from flower_llm.personal import SITE_COMPARISON, comparison_problem, per_site_table

log = logging.getLogger(__name__)


def compare_sites(
    grid: Grid,
    final: ArrayRecord,
    server_round: int,
    timeout: float,
    tasks: bool = False,
    packed: bool = False,
) -> dict[str, Any]:
    """summary.json's ``per-site`` section: every connected site's three scores.

    ``tasks`` (``eval.tasks``) asks each site to answer its task files with every adapter
    too, as round evaluation does.

    A site that answers with an error or without scores is listed under ``missing`` with
    the reason; it never fails the run.
    """
    nodes = sorted(grid.get_node_ids())
    config = ConfigRecord(
        {wire.SERVER_ROUND: server_round, SITE_COMPARISON: True, wire.EVAL_TASKS: tasks}
    )
    content = RecordDict({wire.ARRAYS: final, wire.CONFIG: config})
    content = wire.pack(content) if packed else content  # fed.wire-layout
    messages = [
        Message(
            content=content,
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )
        for node in nodes
    ]
    scores: dict[int, dict[str, Any]] = {}
    names: dict[int, str] = {}
    missing: dict[str, str] = {}
    replied: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        replied.add(node)
        if reply.has_error():
            missing[f"node {node}"] = f"error: {reply.error.reason}"
            continue
        record = reply.content.metric_records.get(SITE_COMPARISON)
        if record is None:
            missing[f"node {node}"] = f"no MetricRecord '{SITE_COMPARISON}'"
            continue
        # A site's scores are bounded like any metric, and its task counts as counts.
        problem = metric_problem(record) or comparison_problem(record)
        if problem is not None:
            missing[f"node {node}"] = problem
            continue
        scores[node] = dict(record)
        names[node] = site_name(reply.content, node)
    for node in nodes:
        if node not in replied:
            missing[f"node {node}"] = "no reply before the round timeout"
    for label, reason in missing.items():
        log.warning("Per-site comparison: %s gave no scores (%s)", label, reason)
    labels = unique_site_names(names)  # two sites never share a row
    table = per_site_table({labels[node]: row for node, row in scores.items()})
    if missing:
        table["missing"] = missing
    return table
