"""A ClientApp where one site goes silent in SecAgg+'s training stage, for an e2e test.

The site with partition-id 3 waits ``SILENT_SECONDS`` before it trains and answers round
1's masked-vectors stage, well past the stage's timeout in the test: the server must end
the round without it. Only round 1: a simulation runs a few workers for all sites, and a
site asleep in every round would hold them all, silencing the others too. Every other
message, and every other site, is the project's ClientApp unchanged.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client_apps import qlora
from flower_llm import wire

SILENT_PARTITION = 3
SILENT_ROUND = 1
SILENT_SECONDS = 45.0

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The project's train handler, late at one site's masked-vectors stage."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    partition = int(context.node_config.get("partition-id", -1))
    fit_config = msg.content.config_records.get("fitins.config")  # the legacy FitIns' config
    server_round = int(fit_config.get(wire.SERVER_ROUND, 0)) if fit_config else 0  # type: ignore[arg-type]
    if (partition, server_round, stage) == (
        SILENT_PARTITION,
        SILENT_ROUND,
        Stage.COLLECT_MASKED_VECTORS,
    ):
        time.sleep(SILENT_SECONDS)
    return qlora.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Honest evaluation."""
    return qlora.evaluate(msg, context)
