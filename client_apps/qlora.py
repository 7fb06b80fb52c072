"""ClientApp: QLoRA fine-tuning of the global adapter on this site's data.

Thin by design: parse the run-config, get the (cached) session, call the library, reply.

Importing this module does not import torch, transformers or peft: a SuperNode starts a
new ClientApp process for every message, and the three SecAgg+ stages that only exchange
keys and shares (``client_apps.secagg``) need none of them. The training stack loads with
the first session.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_apps.secagg import AdapterTrainer, make_app
from flower_llm import secagg, tasks, updates, wire
from flower_llm.compression import WIRE_FORMAT
from flower_llm.config import parse_run_config, round_settings
from flower_llm.logs import setup_logging
from flower_llm.personal import SITE_COMPARISON
from flower_llm.preflight import client_fails_loud
from flower_llm.worker import site_worker_mod

if TYPE_CHECKING:
    from flower_llm.client import ClientSession, SessionCache, SiteIdentity
    from flower_llm.config import DataConfig
    from flower_llm.personal import LocalB
    from flower_llm.site_state import SiteStateStore

# With node-config `worker-socket`, every message goes to the site's long-lived worker
# (flower_llm.worker), which runs this same app on a model it keeps loaded.
app = ClientApp(mods=[site_worker_mod])


@functools.cache
def sessions() -> SessionCache:
    """This process's sessions: the base model is a client's costly part, kept for its life."""
    from flower_llm.client import SessionCache

    return SessionCache()


@functools.cache
def checked_site_data(data: DataConfig, site: SiteIdentity, seed: int) -> int:
    """This site's data, checked once per process before any model loads (records)."""
    from flower_llm.data import check_site_data

    return check_site_data(data, site.data_path, site.partition_id, site.num_partitions, seed)


def site_label(site: SiteIdentity) -> str:
    """How the end-of-run report names this site: its data file, or its partition.

    A data file is named by its base name and the first 6 hex digits of the hash of its
    absolute path (the digest of :meth:`SiteIdentity.key`), so two sites whose files share
    a base name get different, stable labels; the server still tells apart two sites that
    give the same label (:func:`flower_llm.outputs.unique_site_names`).
    """
    if site.data_path:
        return f"{os.path.basename(site.data_path)} #{site.key().rsplit('-', 1)[1][:6]}"
    return f"partition {site.partition_id}/{site.num_partitions}"


LOCAL_ONLY_STATE = "local-only-adapter"


def session_for(context: Context) -> ClientSession:
    """Parse settings at the edge and return this process's session."""
    from flower_llm.client import SiteIdentity

    setup_logging()
    cfg = parse_run_config(context.run_config)
    site = SiteIdentity.from_node_config(context.node_config)
    checked_site_data(cfg.data, site, cfg.seed)  # before the model loads, cheap
    return sessions().get(cfg, site)


def session_and_keys(context: Context) -> tuple[AdapterTrainer, list[str]]:
    """This process's session for SecAgg+, and its adapter keys in wire order."""
    from flower_llm.adapters import adapter_state  # the torch stack: the training stage only
    from flower_llm.client import SiteTrainer

    session = session_for(context)
    trainer = SiteTrainer(session, context.node_config, context.run_id)
    keys = secagg.ordered_keys(adapter_state(session.model))
    if session.cfg.fed.personalization == "local-b":
        from flower_llm import personal

        # Only A enters the secure sum; the trainer keeps each round's B at the site.
        local_b = personal.local_b_trainer(trainer, personal.stash_for(context, session))
        return local_b, personal.shared_keys(keys, "local-b")
    return trainer, keys


def local_b_site(context: Context, session: ClientSession) -> LocalB | None:
    """This site's own-B keeper under ``fed.personalization = local-b``, else None."""
    if session.cfg.fed.personalization != "local-b":
        return None
    from flower_llm import personal

    return personal.LocalB(session, personal.stash_for(context, session))


# SecAgg+ exists only on Flower's legacy API: its ClientApp runs the protocol's four stages
# (all train messages) around the same sessions.
secagg_app = make_app(session_and_keys)


def held_global_store(
    instruction: RecordDict, context: Context, session: ClientSession
) -> SiteStateStore | None:
    """Where a site keeps the global adapter it holds, when the instruction is compressed
    (an update applies to it; after a restart it is read back from there)."""
    if not updates.is_compressed(instruction):
        return None
    from flower_llm.client import site_store

    return site_store(context.node_config, session.cfg, session.site, context.run_id)


@app.train()
@client_fails_loud  # a data or config mistake: an error reply naming it
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter; reply with it, the example and token counts."""
    if parse_run_config(context.run_config).fed.aggregation == "secagg+":
        return secagg_app(msg, context)
    session = session_for(context)
    # Either layout (fed.wire-layout); the reply goes back in the one received.
    instruction, packed = wire.unpack(msg.content)
    # A stock Flower strategy may send no learning rate: the run-config's schedule applies.
    config = instruction.config_records.get(wire.CONFIG, ConfigRecord())
    server_round, learning_rate = round_settings(config, session.cfg)
    # A plain adapter, a compressed one applied to the global adapter this site holds, or
    # the run's initial adapter rebuilt here from the seed (an `initial` instruction).
    store = held_global_store(instruction, context, session)
    global_state, received = updates.receive(
        context.state, instruction, store, session.initial_global
    )
    wire_dtype = session.cfg.fed.wire_dtype
    # local-b: the server sent A alone; the site trains it with its own B.
    local_b = local_b_site(context, session)
    start = local_b.start(global_state, server_round) if local_b is not None else global_state

    from flower_llm.client import train_site_round

    trained = train_site_round(
        session, start, server_round, learning_rate, context.node_config, context.run_id
    )
    state, stats, dpsgd_epsilons = trained.state, trained.stats, trained.dpsgd_epsilons
    if local_b is not None:
        local_b.keep(state, server_round)  # B stays here; to_send below sends A alone
    clip_norm = float(config[wire.CLIP_NORM]) if wire.CLIP_NORM in config else None  # type: ignore[arg-type]
    if clip_norm is not None and received is None:
        from flower_llm.client import clip_adapter_update

        # privacy.mode = client-fixed: bound the update before it leaves the site.
        state = clip_adapter_update(state, global_state, clip_norm)
    metrics = MetricRecord(session.train_reply_metrics(stats))
    if dpsgd_epsilons is not None:
        metrics[wire.DPSGD_EPSILON] = dpsgd_epsilons["epsilon"]
        metrics[wire.DPSGD_PLD_EPSILON] = dpsgd_epsilons["pld-epsilon"]
        metrics[wire.DPSGD_RDP_EPSILON] = dpsgd_epsilons["rdp-epsilon"]
    content = RecordDict({wire.METRICS: metrics})
    if bool(config.get(wire.SITE_LABEL, False)):
        content[wire.SITE] = ConfigRecord({"label": site_label(session.site)})
    if received is None:
        content[wire.ARRAYS] = wire.to_array_record(session.to_send(state), wire_dtype)
    else:  # fed.wire-dtype bfloat16 | int8 | nf4: the update, with error feedback
        content[wire.ARRAYS], content[WIRE_FORMAT] = session.compressed_reply(
            context.state,
            store,
            received,
            state,
            global_state,
            server_round,
            context.run_id,
            clip_norm,
        )

    if session.cfg.output.local_only_baseline:
        # The same steps on the same batches, but never averaged with anyone: the
        # reference that tells whether federating helped this site.
        kept = context.state.array_records.get(LOCAL_ONLY_STATE)
        local_start = wire.from_array_record(kept) if kept is not None else start
        local_state, _ = session.train(local_start, server_round, learning_rate)
        context.state[LOCAL_ONLY_STATE] = wire.to_array_record(local_state)
        if bool(config.get(wire.SEND_LOCAL_ONLY, False)):
            content[wire.LOCAL_ONLY_ARRAYS] = wire.to_array_record(local_state, wire_dtype)
            content[wire.SITE] = ConfigRecord({"label": site_label(session.site)})
    return Message(content=wire.pack(content) if packed else content, reply_to=msg)


@app.evaluate()
@client_fails_loud  # a data or config mistake: an error reply naming it
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received adapter on this site's held-out split (and its task file)."""
    session = session_for(context)
    instruction, _ = wire.unpack(msg.content)  # its reply carries no arrays to pack
    config = instruction.config_records.get(wire.CONFIG, ConfigRecord())
    store = held_global_store(instruction, context, session)
    global_state, received = updates.receive(
        context.state, instruction, store, session.initial_global
    )
    if bool(config.get(SITE_COMPARISON, False)):
        return compare_on_site(msg, context, session, global_state)
    # Read before any work, so a malformed task file fails at once, naming file:line.
    site_tasks = tasks.site_tasks(session.cfg, session.site, context.node_config, config)
    local_b = local_b_site(context, session)
    stats = session.evaluate(local_b.start(global_state) if local_b is not None else global_state)
    metrics = MetricRecord(
        {
            wire.NUM_EXAMPLES: stats.examples,
            wire.EVAL_LOSS: stats.loss,
            wire.EVAL_PERPLEXITY: stats.perplexity,
            wire.EVAL_TOKEN_ACCURACY: stats.token_accuracy,
            wire.EVAL_TOKENS: stats.tokens,
        }
    )
    if site_tasks:
        # The adapter just evaluated is still loaded; only counts leave the site.
        scores = tasks.site_task_scores(
            session.model, session.base.tokenizer, session.cfg, site_tasks
        )
        metrics.update(tasks.reply_metrics(scores))
    content = RecordDict({wire.METRICS: metrics})
    if bool(config.get(wire.SITE_LABEL, False)):
        content[wire.SITE] = ConfigRecord({"label": site_label(session.site)})
    if received is not None:  # tell the server which global version this site now holds
        content[WIRE_FORMAT] = updates.holds_record(context.state, received)
    return Message(content=content, reply_to=msg)


def compare_on_site(
    msg: Message, context: Context, session: ClientSession, received: dict[str, Any]
) -> Message:
    """End of run: scores of the local-only, global and personal adapters on this site's
    held-out split; the adapters themselves stay here."""
    from flower_llm import personal

    kept = context.state.array_records.get(LOCAL_ONLY_STATE)
    config = msg.content.config_records[wire.CONFIG]
    scores = personal.compare_on_site(
        session,
        personal.stash_for(context, session),
        received,
        wire.from_array_record(kept) if kept is not None else None,
        int(config[wire.SERVER_ROUND]),  # type: ignore[arg-type]
        tasks.site_tasks(session.cfg, session.site, context.node_config, config),
    )
    content = RecordDict(
        {
            SITE_COMPARISON: MetricRecord(scores),  # type: ignore[arg-type]
            wire.SITE: ConfigRecord({"label": site_label(session.site)}),
        }
    )
    return Message(content=content, reply_to=msg)
