"""A ClientApp where two sites misbehave, for the e2e test of the server's reply bounds.

The site with partition-id 0 replies with float64 values of 1e300 (finite, but Inf once
cast to float32); the site with partition-id 1 trains honestly but claims 1e12 training
examples. Every other site is the project's ClientApp, unchanged.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client_apps import qlora
from flower_llm import wire

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train as an honest site, then tamper with the reply by partition id."""
    reply = qlora.train(msg, context)
    partition = int(context.node_config.get("partition-id", -1))
    if partition == 0:
        # float64 has no place in the packed layout: this site answers in the arrays
        # layout, which the server reads as well, so the value bounds are what refuse it.
        content, _ = wire.unpack(reply.content)
        honest = content.array_records[wire.ARRAYS]
        content[wire.ARRAYS] = ArrayRecord(
            {k: Array(np.full(a.shape, 1e300, np.float64)) for k, a in honest.items()}
        )
        return Message(content, reply_to=msg)
    elif partition == 1:
        reply.content[wire.METRICS][wire.NUM_EXAMPLES] = 10**12
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Honest evaluation."""
    return qlora.evaluate(msg, context)
