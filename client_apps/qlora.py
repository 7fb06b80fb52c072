"""ClientApp: QLoRA fine-tuning of the global adapter on this site's data.

Thin by design: parse the run-config, get the (cached) session, call the library, reply.

Importing this module does not import torch, transformers or peft: a SuperNode starts a
new ClientApp process for every message, and the three SecAgg+ stages that only exchange
keys and shares (``client_apps.secagg``) need none of them. The training stack loads with
the first session.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_llm import wire
from flower_llm.config import parse_run_config
from flower_llm.logs import setup_logging
from flower_llm.worker import site_worker_mod

if TYPE_CHECKING:
    from flower_llm.client import ClientSession, SessionCache

# With node-config `worker-socket`, every message goes to the site's long-lived worker
# (flower_llm.worker), which runs this same app on a model it keeps loaded.
app = ClientApp(mods=[site_worker_mod])


@functools.cache
def sessions() -> SessionCache:
    """This process's sessions: the base model is a client's costly part, kept for its life."""
    from flower_llm.client import SessionCache

    return SessionCache()


LOCAL_ONLY_STATE = "local-only-adapter"
# This site's DP-SGD accountant (Opacus RDP history as JSON), kept across rounds.
DPSGD_ACCOUNTANT_STATE = "dpsgd-accountant"


def session_for(context: Context) -> ClientSession:
    """Parse settings at the edge and return this process's session."""
    from flower_llm.client import SiteIdentity

    setup_logging()
    cfg = parse_run_config(context.run_config)
    return sessions().get(cfg, SiteIdentity.from_node_config(context.node_config))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter; reply with it, the example and token counts."""
    if parse_run_config(context.run_config).fed.aggregation == "secagg+":
        # SecAgg+ exists only on Flower's legacy API: its ClientApp runs the protocol's four
        # stages (all train messages) around the same session.
        from client_apps.secagg import app as secagg_app

        return secagg_app(msg, context)
    session = session_for(context)
    config = msg.content[wire.CONFIG]
    server_round = int(config[wire.SERVER_ROUND])  # type: ignore[arg-type]
    learning_rate = float(config[wire.LEARNING_RATE])  # type: ignore[arg-type]
    global_state = wire.from_array_record(msg.content.array_records[wire.ARRAYS])
    wire_dtype = session.cfg.fed.wire_dtype

    dpsgd_epsilon = None
    if session.cfg.privacy.dpsgd:
        kept_accountant = context.state.config_records.get(DPSGD_ACCOUNTANT_STATE)
        history = str(kept_accountant["history"]) if kept_accountant is not None else None
        state, dp_result = session.train_dp(global_state, learning_rate, history)
        context.state[DPSGD_ACCOUNTANT_STATE] = ConfigRecord(
            {"history": dp_result.accountant_state}
        )
        stats, dpsgd_epsilon = dp_result.stats, dp_result.epsilon
    else:
        state, stats = session.train(global_state, server_round, learning_rate)
    if wire.CLIP_NORM in config:
        from flower_llm.client import clip_adapter_update

        # privacy.mode = client-fixed: bound the update before it leaves the site.
        state = clip_adapter_update(state, global_state, float(config[wire.CLIP_NORM]))  # type: ignore[arg-type]
    metrics = MetricRecord(
        {
            wire.NUM_EXAMPLES: stats.examples,
            wire.NUM_TOKENS: stats.tokens,
            wire.TRAIN_LOSS: stats.loss,
            wire.TRAIN_SECONDS: stats.seconds,
        }
    )
    if dpsgd_epsilon is not None:
        metrics[wire.DPSGD_EPSILON] = dpsgd_epsilon
    content = RecordDict(
        {wire.ARRAYS: wire.to_array_record(state, wire_dtype), wire.METRICS: metrics}
    )

    if session.cfg.output.local_only_baseline:
        # The same steps on the same batches, but never averaged with anyone: the
        # reference that tells whether federating helped this site.
        kept = context.state.array_records.get(LOCAL_ONLY_STATE)
        local_start = wire.from_array_record(kept) if kept is not None else global_state
        local_state, _ = session.train(local_start, server_round, learning_rate)
        context.state[LOCAL_ONLY_STATE] = wire.to_array_record(local_state)
        if bool(config.get(wire.SEND_LOCAL_ONLY, False)):
            content[wire.LOCAL_ONLY_ARRAYS] = wire.to_array_record(local_state, wire_dtype)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this site's held-out split."""
    session = session_for(context)
    stats = session.evaluate(wire.from_array_record(msg.content.array_records[wire.ARRAYS]))
    metrics = MetricRecord(
        {
            wire.NUM_EXAMPLES: stats.examples,
            wire.EVAL_LOSS: stats.loss,
            wire.EVAL_PERPLEXITY: stats.perplexity,
            wire.EVAL_TOKEN_ACCURACY: stats.token_accuracy,
            wire.EVAL_TOKENS: stats.tokens,
        }
    )
    return Message(content=RecordDict({wire.METRICS: metrics}), reply_to=msg)
