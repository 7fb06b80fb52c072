"""Fake sites' rebuild of the run's initial adapter (``initial`` instructions).

Sites without a model (the record-level fakes of the engine and compression tests) rebuild
it the way the server builds it, from the same settings; the real ClientApp rebuilds it
from the model it trains (:meth:`flower_llm.client.ClientSession.initial_global`).
"""

from __future__ import annotations

from typing import Any

from flower_llm import updates
from flower_llm.adapters import AdapterState


def rebuilt_initial(run_config: dict[str, Any] | None = None) -> updates.InitialBuilder:
    """The initial adapter of ``run_config`` (default settings when None), and its recipe."""
    from flower_llm.adapters import init_adapter
    from flower_llm.config import parse_run_config
    from flower_llm.models import resolve_model_path
    from flower_llm.personal import shared_part

    cfg = parse_run_config(dict(run_config or {}))

    def build() -> tuple[AdapterState, updates.InitialRecipe]:
        state, _ = init_adapter(cfg.model, cfg.lora, resolve_model_path(cfg.model), cfg.seed)
        state = shared_part(state, cfg.fed.personalization)
        return state, updates.InitialRecipe.of(state, cfg.seed)

    return build
