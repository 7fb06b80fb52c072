"""One site's side of federated fine-tuning, independent of Flower's APIs.

A :class:`ClientSession` holds the quantized base model with its LoRA adapters and the
site's tokenized data. Both ClientApps (Message API and the legacy SecAgg+ one) drive the
same session, so the training, evaluation and serialisation logic exists once.

Loading a base model is the expensive part of a client; :class:`SessionCache` loads it
once per process and shares it between rounds and between the sites the process serves.
Flower's simulation engine keeps its client processes alive and hands each one a different
virtual client on nearly every call, so there the model loads once per actor and only the
site's data is prepared per site; in a deployment, a SuperNode starts a fresh ClientApp
process per message and the cache holds for that message only (see benchmarks for what a
reload costs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flower_llm import wire
from flower_llm.adapters import AdapterState, adapter_state, apply_lora, load_adapter_state
from flower_llm.config import LoraSettings, RunConfig
from flower_llm.data import ClientData, make_dataloader, prepare_client_data
from flower_llm.lora_aggregation import is_lora_a, sent_keys, shared_keys
from flower_llm.models import BaseModel, describe, load_base_model
from flower_llm.plan import (
    MemoryPlan,
    OutOfGpuMemory,
    estimate_memory,
    memory_advice,
    run_plan_settings,
)
from flower_llm.site_state import SiteStateEntry, SiteStateStore, run_key, site_state_dir
from flower_llm.train import (
    EvalStats,
    TrainStats,
    cycle_batches,
    evaluate,
    response_tokens,
    train_adapter,
)

if TYPE_CHECKING:  # opacus loads only when DP-SGD is on
    from flower_llm.privacy.dpsgd import DpSgdResult
    from flower_llm.updates import InitialRecipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteIdentity:
    """Which data this client holds: its own file, or a partition of a shared source."""

    data_path: str | None = None
    partition_id: int = 0
    num_partitions: int = 1
    lora_r: int | None = None
    """node-config ``lora-r``: this site's own LoRA rank (at most ``lora.r``)."""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteIdentity:
        """Read ``data-path`` (deployment) or ``partition-id``/``num-partitions`` (simulation)."""
        data_path = node_config.get("data-path")
        if data_path is not None and not isinstance(data_path, str):
            raise ValueError(f"node-config 'data-path' must be a string, got {data_path!r}")
        partition_id = int(node_config.get("partition-id", 0))
        num_partitions = int(node_config.get("num-partitions", 1))
        if not 0 <= partition_id < num_partitions:
            raise ValueError(
                f"node-config 'partition-id' = {partition_id} is outside "
                f"[0, num-partitions = {num_partitions})"
            )
        lora_r = node_config.get("lora-r")
        if lora_r is not None and (isinstance(lora_r, bool) or not isinstance(lora_r, int)):
            raise ValueError(f"node-config 'lora-r' must be an integer, got {lora_r!r}")
        return cls(data_path or None, partition_id, num_partitions, lora_r)

    def key(self) -> str:
        """A file name for this site's kept state, stable across runs and processes.

        ``partition-<id>-of-<n>`` in simulation; with a data file, its name and a hash of its
        absolute path, so two sites on one machine never share state.
        """
        if self.data_path is None:
            return f"partition-{self.partition_id}-of-{self.num_partitions}"
        path = Path(self.data_path).expanduser().resolve()
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name).strip("._")[:60] or "data"
        return f"data-{readable}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


#: Site-state entry of a site's DP-SGD accountant.
DPSGD_ACCOUNTANT_ENTRY = "dpsgd-accountant"


def site_store(
    node_config: Mapping[str, Any], cfg: RunConfig, site: SiteIdentity, run_id: int
) -> SiteStateStore:
    """This site's state store for this run (see :mod:`flower_llm.site_state`)."""
    return SiteStateStore(
        site_state_dir(node_config), run_key(cfg.output.run_name, run_id), site.key()
    )


def continued_entry(
    entry: SiteStateEntry | None, run_id: int, resume: bool, server_round: int, path: Path
) -> SiteStateEntry | None:
    """The kept entry this round continues from, or None to start afresh.

    State written by this Flower run, or by an earlier one when this run resumes it
    (``output.resume``), continues. A fresh run that reuses the run name (the server moved
    the earlier run's directory aside) starts afresh, as its outputs do.
    """
    if entry is None:
        return None
    if entry.run_id != run_id and not resume:
        log.warning(
            "Site state %s was written by run %d; this is a new run of the same name "
            "(output.resume = false), so it starts afresh",
            path,
            entry.run_id,
        )
        return None
    last_round = entry.data.get("last-round")
    if isinstance(last_round, int) and last_round >= server_round:
        # The round ran here before the interruption and its update may have reached the
        # server: its privacy loss is real, so it is counted again, never dropped.
        log.warning(
            "Site state %s already accounts round %d; round %d is accounted on top",
            path,
            last_round,
            server_round,
        )
    return entry


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers, stable across processes (unlike ``hash``)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % 2**31)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class LoadedModel:
    """A base model with LoRA applied: what every site of the same settings can share.

    Sharing is safe because a session never relies on what the adapter held before: every
    train and evaluate call first loads the adapter it is given, seeds dropout from
    (seed, site, round), and the base weights are frozen.
    """

    base: BaseModel
    model: Any
    """The PEFT model around ``base.model``."""


def site_lora(cfg: RunConfig, site: SiteIdentity) -> LoraSettings:
    """``cfg.lora`` at this site's rank (node-config ``lora-r``, ``lora.site-ranks``)."""
    rank = cfg.lora.site_rank(site.partition_id, site.lora_r)
    if rank == cfg.lora.r:
        return cfg.lora
    return dataclasses.replace(cfg.lora, r=rank, site_ranks="")


def load_model(
    cfg: RunConfig, device: torch.device | None = None, lora: LoraSettings | None = None
) -> LoadedModel:
    """Load the base model of ``cfg.model`` and apply ``lora`` (default ``cfg.lora``)."""
    lora = lora or cfg.lora
    seed_everything(cfg.seed)
    base = load_base_model(cfg.model, device)
    model = apply_lora(base.model, lora, base.name_or_path)
    if lora.aggregation == "ffa":
        # FFA-LoRA: A stays at the initialisation every site receives from the server, so
        # the sites' products share one A and FedAvg of B is exact.
        for name, param in model.named_parameters():
            if is_lora_a(name):
                param.requires_grad_(False)
    log.info("Loaded base model: %s", describe(base))
    if _gpu_bytes(model) is not None:
        plan = _memory_plan(model, cfg, lora.r, base.name_or_path)
        if plan.fits is False:
            log.warning(
                "Training will likely run out of GPU memory: %s", memory_advice(model.config, plan)
            )
    return LoadedModel(base, model)


def _memory_plan(model: Any, cfg: RunConfig, lora_r: int, name: str) -> MemoryPlan:
    """``flower-llm plan``'s estimate for this site's run settings on the GPU that holds
    ``model`` (fits unknown off CUDA)."""
    return estimate_memory(
        model.config, run_plan_settings(cfg, lora_r), gpu_bytes=_gpu_bytes(model), model=name
    )


def _gpu_bytes(model: Any) -> int | None:
    """Total memory of the CUDA device ``model`` is on, None off CUDA."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


class ClientSession:
    """Base model + LoRA + local data of one site; trains and evaluates adapters.

    ``loaded`` shares a model that is already loaded (see :class:`SessionCache`); without
    it the session loads its own.
    """

    def __init__(
        self,
        cfg: RunConfig,
        site: SiteIdentity,
        device: torch.device | None = None,
        *,
        loaded: LoadedModel | None = None,
    ):
        self.cfg = cfg
        self.site = site
        self.lora = site_lora(cfg, site)
        """LoRA settings of this site's model: ``cfg.lora`` at the site's rank."""
        if loaded is None:
            loaded = load_model(cfg, device, self.lora)
        seed_everything(cfg.seed)
        self.base: BaseModel = loaded.base
        self.model = loaded.model
        self._num_train_tokens: int | None = None
        self.data: ClientData = prepare_client_data(
            cfg.data,
            self.base.tokenizer,
            partition_id=site.partition_id,
            num_partitions=site.num_partitions,
            seed=cfg.seed,
            data_path=site.data_path,
        )
        log.info(
            "Client session for %s: %d train / %d held-out examples",
            site.data_path or f"partition {site.partition_id} of {site.num_partitions}",
            self.data.num_train_examples,
            self.data.num_eval_examples,
        )

    @property
    def num_train_tokens(self) -> int:
        """Response tokens in this site's training examples (``fed.weighting = tokens``)."""
        if self._num_train_tokens is None:
            self._num_train_tokens = response_tokens(self.data.train)
        return self._num_train_tokens

    def train_reply_metrics(
        self, stats: TrainStats
    ) -> dict[str, int | float | list[int] | list[float]]:
        """What a train reply reports: what the site holds, and what it trained on.

        ``num-examples`` is the number of training examples the site holds, ``n_k`` of
        FedAvg (as FlowerTune sends ``len(trainset)``); the ``-seen`` counts are this
        round's, counting repeats.
        """
        return {
            wire.NUM_EXAMPLES: self.data.num_train_examples,
            wire.NUM_TOKENS: self.num_train_tokens,
            wire.NUM_EXAMPLES_SEEN: stats.examples,
            wire.NUM_TOKENS_SEEN: stats.tokens,
            wire.TRAIN_LOSS: stats.loss,
            wire.TRAIN_SECONDS: stats.seconds,
        }

    def from_global(self, state: AdapterState) -> AdapterState:
        """``state`` at this site's rank (re-factored when it differs, else as it is).

        Only ``exact`` aggregation mixes ranks: the global adapter (rank ``lora.r``), or
        another site's local-only adapter sent for evaluation.
        """
        if self.cfg.lora.aggregation != "exact":
            return state
        from flower_llm.lora_aggregation import to_rank

        return to_rank(state, self.lora.r)

    def initial_global(self) -> tuple[AdapterState, InitialRecipe]:
        """The run's initial global adapter, rebuilt here, and its recipe.

        The server draws it on a meta-device skeleton (:func:`flower_llm.adapters.
        init_adapter`); the site draws the same values from the same seed over the keys
        and shapes of the model it already trains (no second model), at the global rank
        ``lora.r`` (a site of its own rank re-factors it like any global adapter), and
        keeps the part that travels (A alone under ``local-b``).
        """
        from peft.utils import get_peft_model_state_dict

        from flower_llm.adapters import seeded_initial
        from flower_llm.lora_aggregation import is_lora_a, shared_keys
        from flower_llm.updates import InitialRecipe

        site_r, global_r = self.lora.r, self.cfg.lora.r
        shapes = []
        for key, tensor in get_peft_model_state_dict(self.model).items():
            shape = tuple(tensor.shape)
            if site_r != global_r and is_lora_a(key):
                shape = (global_r, *shape[1:])  # A is (r, in)
            elif site_r != global_r and ".lora_B." in key:
                shape = (*shape[:-1], global_r)  # B is (out, r)
            shapes.append((key, shape))
        initial = seeded_initial(shapes, self.cfg.seed)
        state = {k: initial[k] for k in shared_keys(initial, self.cfg.fed.personalization)}
        return state, InitialRecipe.of(state, self.cfg.seed)

    def compressed_reply(
        self,
        node_state: Any,
        store: SiteStateStore | None,
        received: Any,
        local: AdapterState,
        global_state: AdapterState,
        server_round: int,
        run_id: int,
        clip_norm: float | None = None,
    ) -> tuple[Any, Any]:
        """The arrays and header of a compressed train reply (``fed.wire-dtype`` bfloat16,
        int8 or nf4): ``Q(u + e)`` with ``u`` the trained adapter minus the global one this
        site started from (at its rank, the keys it sends), ``e`` its residual, clipped to
        ``clip_norm`` under client-fixed DP (see :func:`flower_llm.updates.send_update`)."""
        from flower_llm.updates import UplinkSettings, send_update

        fed = self.cfg.fed
        settings = UplinkSettings(
            fed.wire_dtype, fed.wire_block_size, fed.error_feedback, run_id, self.cfg.output.resume
        )
        base = self.to_send(self.from_global(global_state))
        return send_update(
            node_state,
            store,
            settings,
            self.to_send(local),
            base,
            received,
            server_round,
            clip_norm,
        )

    def to_send(self, state: AdapterState) -> AdapterState:
        """The part of a trained adapter that goes up: all of it, B only with ``ffa``, A
        only with ``fed.personalization = local-b`` (each site's B never leaves it)."""
        keys = shared_keys(
            sent_keys(state, self.cfg.lora.aggregation), self.cfg.fed.personalization
        )
        return {k: state[k] for k in keys}

    @property
    def pad_id(self) -> int:
        """Token id used for padding."""
        return int(self.base.tokenizer.pad_token_id)

    def batches_for_round(self, server_round: int) -> Any:
        """Training batches of a round, shuffled by (seed, site, round).

        Deriving the order from the round rather than from iterator state keeps a
        resumed run on the same batches as an uninterrupted one.
        """
        seed = derive_seed(self.cfg.seed, self.site.partition_id, server_round)
        loader = make_dataloader(
            self.data.train, self.cfg.train.batch_size, shuffle=True, seed=seed, pad_id=self.pad_id
        )
        return cycle_batches(loader)

    @contextlib.contextmanager
    def gpu_memory_guard(self, doing: str) -> Iterator[None]:
        """Turn CUDA's out-of-memory error while ``doing`` into :class:`OutOfGpuMemory`
        naming the plan of this site's settings and the settings that lower it; the
        gradients and the allocator's cache are freed first, so the process (a site
        worker, a simulation actor) can serve its next job."""
        try:
            yield
        except torch.OutOfMemoryError as error:
            self.model.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            plan = _memory_plan(self.model, self.cfg, self.lora.r, self.base.name_or_path)
            advice = memory_advice(self.model.config, plan)
            raise OutOfGpuMemory(
                f"out of GPU memory while {doing} ({first_line}): {advice}"
            ) from error

    def train(
        self,
        global_state: AdapterState,
        server_round: int,
        learning_rate: float,
        *,
        steps: int | None = None,
    ) -> tuple[AdapterState, TrainStats]:
        """Start from ``global_state``, train ``steps`` (default: the round's local steps),
        return the adapter."""
        load_adapter_state(self.model, self.from_global(global_state))
        torch.manual_seed(derive_seed(self.cfg.seed, self.site.partition_id, server_round, 1))
        with self.gpu_memory_guard("training"):
            stats = train_adapter(
                self.model,
                self.batches_for_round(server_round),
                steps=self.cfg.train.local_steps if steps is None else steps,
                learning_rate=learning_rate,
                grad_accum=self.cfg.train.grad_accum,
                weight_decay=self.cfg.train.weight_decay,
                max_grad_norm=self.cfg.train.max_grad_norm,
            )
        return adapter_state(self.model), stats

    def train_dp(
        self,
        global_state: AdapterState,
        learning_rate: float,
        server_round: int,
        store: SiteStateStore,
        run_id: int,
        seed: int | None = None,
    ) -> tuple[AdapterState, DpSgdResult]:
        """As :meth:`train`, with sample-level DP-SGD (``privacy.dpsgd-*`` settings).

        The site's accountant is read from ``store`` (see :func:`continued_entry`) and
        written back after the round, so epsilon accumulates over rounds and over a resume.
        Batches and noise are drawn from an operating-system seed unless ``seed`` is given
        (tests): the run-config seed is public, and known noise protects nothing.
        """
        from flower_llm.privacy.dpsgd import train_adapter_dpsgd

        privacy = self.cfg.privacy
        entry = continued_entry(
            store.load(DPSGD_ACCOUNTANT_ENTRY),
            run_id,
            self.cfg.output.resume,
            server_round,
            store.path(DPSGD_ACCOUNTANT_ENTRY),
        )
        load_adapter_state(self.model, self.from_global(global_state))
        with self.gpu_memory_guard("training with DP-SGD"):
            result = train_adapter_dpsgd(
                self.model,
                self.data.train,
                steps=self.cfg.train.local_steps,
                batch_size=self.cfg.train.batch_size,
                learning_rate=learning_rate,
                weight_decay=self.cfg.train.weight_decay,
                noise_multiplier=privacy.dpsgd_noise_multiplier,
                max_grad_norm=privacy.dpsgd_max_grad_norm,
                delta=privacy.dpsgd_delta,
                pad_id=self.pad_id,
                accountant_state=entry.data["accountant"] if entry is not None else None,
                accountant=privacy.accountant,
                seed=seed,
            )
        store.save(
            DPSGD_ACCOUNTANT_ENTRY,
            {"accountant": result.accountant_state, "last-round": server_round},
            run_id,
        )
        # Read from the PEFT model, not Opacus' wrapper (whose keys gain "_module.").
        return adapter_state(self.model), result

    def evaluate(self, state: AdapterState) -> EvalStats:
        """Held-out loss, perplexity and token accuracy of ``state`` on this site."""
        load_adapter_state(self.model, self.from_global(state))
        loader = make_dataloader(
            self.data.eval, self.cfg.train.batch_size, shuffle=False, seed=0, pad_id=self.pad_id
        )
        with self.gpu_memory_guard("evaluating"):
            return evaluate(self.model, loader)


@dataclass
class SiteRound:
    """One site's training of one round, whatever the aggregation mode."""

    state: AdapterState
    stats: TrainStats
    dpsgd_epsilons: dict[str, float] | None
    """``epsilon``, ``pld-epsilon``, ``rdp-epsilon`` of this site under DP-SGD, else None."""


def train_site_round(
    session: ClientSession,
    global_state: AdapterState,
    server_round: int,
    learning_rate: float,
    node_config: Mapping[str, Any],
    run_id: int,
) -> SiteRound:
    """Train one round at this site: plain QLoRA, or DP-SGD with ``privacy.dpsgd``.

    The one place both ClientApp paths (the Message API and SecAgg+) train, so DP-SGD and
    its site-side accountant (kept in the site's state store, which outlives the run: a
    resumed run continues this site's epsilon) apply to every aggregation mode.
    """
    if not session.cfg.privacy.dpsgd:
        state, stats = session.train(global_state, server_round, learning_rate)
        return SiteRound(state, stats, None)
    store = site_store(node_config, session.cfg, session.site, run_id)
    state, result = session.train_dp(global_state, learning_rate, server_round, store, run_id)
    log.info(
        "Site %s round %d: DP-SGD epsilon %.4g at delta %g (%s accountant)",
        session.site.key(),
        server_round,
        result.epsilon,
        result.delta,
        session.cfg.privacy.accountant,
    )
    return SiteRound(state, result.stats, result.epsilons)


@dataclass
class SiteTrainer:
    """A session bound to its node and run: trains rounds as :func:`train_site_round`.

    What the SecAgg+ client trains with (``client_apps.secagg.AdapterTrainer``), so a
    SecAgg+ round runs DP-SGD exactly as a plain one does.
    """

    session: ClientSession
    node_config: Mapping[str, Any]
    run_id: int

    @property
    def cfg(self) -> RunConfig:
        """The session's run-config."""
        return self.session.cfg

    def train(
        self, global_state: AdapterState, server_round: int, learning_rate: float
    ) -> tuple[AdapterState, TrainStats]:
        """Train one round; a DP-SGD epsilon stays at the site (its log and state store)."""
        trained = train_site_round(
            self.session, global_state, server_round, learning_rate, self.node_config, self.run_id
        )
        return trained.state, trained.stats

    def train_reply_metrics(
        self, stats: TrainStats
    ) -> dict[str, int | float | list[int] | list[float]]:
        """The counts a train reply reports (held and seen): the session's."""
        return self.session.train_reply_metrics(stats)


def clip_adapter_update(
    state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray], clip_norm: float
) -> AdapterState:
    """``global + clip(state - global, clip_norm)``: a site's client-side DP-FedAvg clipping.

    The update is clipped in float64 and added back in float64, so the float32 adapter that
    leaves the site differs from the global one by at most ``clip_norm`` up to float32
    rounding of the weights (the server allows a relative 1e-4 for that).
    """
    from flower_llm.privacy.mechanism import clip_update

    update = {
        k: state[k].astype(np.float64) - global_state[k].astype(np.float64) for k in global_state
    }
    clipped, _, _ = clip_update(update, clip_norm)
    return {
        k: (global_state[k].astype(np.float64) + clipped[k]).astype(np.float32)
        for k in global_state
    }


class SessionCache:
    """The sessions of one process: one model, shared by every site the process serves.

    The model loads once per (``model.*``, ``lora.*``) settings; a change of either frees
    it and loads the new one. Each site's session (its prepared data) is kept for the
    ``max_sites`` sites used last, so a simulation actor that serves many virtual clients
    re-prepares only the data of a site it has not seen recently, never the model.
    """

    def __init__(self, max_sites: int = 8) -> None:
        if max_sites < 1:
            raise ValueError(f"max_sites must be >= 1, got {max_sites}")
        self.max_sites = max_sites
        self.model_loads = 0
        self._model_key: tuple[Any, Any] | None = None
        self._loaded: LoadedModel | None = None
        self._sessions: OrderedDict[tuple[RunConfig, SiteIdentity], ClientSession] = OrderedDict()

    def get(self, cfg: RunConfig, site: SiteIdentity) -> ClientSession:
        """The session for (cfg, site): cached, or built on the cached model."""
        key = (cfg, site)
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
            return session
        lora = site_lora(cfg, site)
        model_key = (cfg.model, lora)
        if self._loaded is None or self._model_key != model_key:
            # Free the old model (and the sessions holding it) before loading a new one.
            self._sessions.clear()
            self._loaded = None
            self._loaded = load_model(cfg, lora=lora)
            self._model_key = model_key
            self.model_loads += 1
        session = ClientSession(cfg, site, loaded=self._loaded)
        self._sessions[key] = session
        while len(self._sessions) > self.max_sites:
            self._sessions.popitem(last=False)
        return session
