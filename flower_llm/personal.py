"""Personal adapters: what each site keeps for itself (``fed.personalization``).

- ``local-b`` (FedSA-LoRA, Guo et al., ICLR 2025): only the LoRA ``A`` matrices are
  federated. Each site trains ``global A + its own B`` and replies with ``A`` alone; its
  ``B`` never leaves it. Every site's ``B`` starts as PEFT starts it, at zero (which is
  also the ``B`` of the server's initial adapter), and continues from the ``B`` the site
  trained last round.
- ``finetune``: the rounds are plain FedAvg; after the last one each site fine-tunes the
  final global adapter for ``personal.local-steps`` steps on its own training data.

Personal state lives only at the site, in two places: the run's node state
(``context.state``, what a site reads first) and the site-state store
(:mod:`flower_llm.site_state`), so a resumed run or a restarted site continues it. An
entry is one safetensors file whose metadata names the Flower run that wrote it and the
last round it holds; it is written atomically by the store.

At the end of a run each site evaluates three adapters on its own held-out split: its
local-only adapter (``output.local-only-baseline``), the global one and its personal one
(:func:`compare_on_site`); only the scores travel to the server.

This module needs no Flower message types: the ClientApp and the server pass it plain
adapter states and records.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flower_llm.lora_aggregation import is_lora_a, shared_keys
from flower_llm.site_state import SiteStateError, SiteStateStore

if TYPE_CHECKING:
    from flower_llm.client import ClientSession, SiteTrainer
    from flower_llm.tasks import Task
    from flower_llm.train import TrainStats

log = logging.getLogger(__name__)

AdapterState = dict[str, np.ndarray]

PERSONAL_B = "personal-b"
"""Node-state key and site-state entry of a ``local-b`` site's own B matrices."""
PERSONAL_ADAPTER = "personal-adapter"
"""Site-state entry of a site's whole personal adapter at the end of the run (export)."""
SITE_COMPARISON = "site-comparison"
"""Config flag of the end-of-run evaluate message; key of the scores in its reply."""

ADAPTERS = ("local-only", "global", "personal")
"""The adapters of the per-site comparison, in report order."""

_FORMAT = "flower-llm/personal-adapter"


# --------------------------------------------------------------------------------------
# What is shared
# --------------------------------------------------------------------------------------


def shared_part(state: Mapping[str, np.ndarray], personalization: str) -> AdapterState:
    """The part of ``state`` that travels (:func:`shared_keys`)."""
    return {k: state[k] for k in shared_keys(state, personalization)}


def kept_part(state: Mapping[str, np.ndarray], personalization: str) -> AdapterState:
    """The part of ``state`` that never travels: the B matrices under ``local-b``."""
    shared = set(shared_keys(state, personalization))
    return {k: state[k] for k in state if k not in shared}


def zero_b(template: Mapping[str, np.ndarray]) -> AdapterState:
    """PEFT's initial B (zeros) for every non-A matrix of ``template``."""
    return {k: np.zeros(v.shape, np.float32) for k, v in template.items() if not is_lora_a(k)}


# --------------------------------------------------------------------------------------
# Where a site keeps it
# --------------------------------------------------------------------------------------


@dataclass
class PersonalStash:
    """A site's personal state: the run's node state first, then the site-state store.

    Parameters
    ----------
    node_state : mapping
        ``context.state.array_records`` of the ClientApp (lives for one Flower run).
    store : SiteStateStore
        This site's store (outlives the run: a resume or a restarted site reads it).
    run_id : int
        The Flower run writing now.
    resume : bool
        ``output.resume``: state written by an earlier Flower run of the same name continues.
    """

    node_state: MutableMapping[str, Any]
    store: SiteStateStore
    run_id: int
    resume: bool

    def load(self, name: str, before_round: int | None = None) -> AdapterState | None:
        """Entry ``name`` from the node state, else from the store; None when neither has it.

        A stored entry written by another Flower run is used only when this run resumes
        it; a fresh run that reuses the run name starts afresh, as its outputs do. With
        ``before_round``, a stored entry that already holds that round (the site trained
        it, then the run was interrupted before the server's checkpoint) gives way to the
        entry it replaced, so the round is trained again from the same state.
        """
        from flower_llm import wire

        record = self.node_state.get(name)
        if record is not None:
            return wire.from_array_record(record)
        loaded = self.load_stored(name)
        if loaded is None:
            return None
        state, meta = loaded
        if before_round is not None and meta["last-round"] >= before_round:
            previous = read_entry(self.store, previous_name(name))
            if previous is not None and previous[1]["last-round"] < before_round:
                log.warning(
                    "Personal state %s holds round %d already (trained before an "
                    "interruption); round %d starts from the state of round %d",
                    self.file(name),
                    meta["last-round"],
                    before_round,
                    previous[1]["last-round"],
                )
                state, meta = previous
        if meta["run-id"] != self.run_id and not self.resume:
            log.warning(
                "Personal state %s was written by run %d; this is a new run of the same name "
                "(output.resume = false), so it starts afresh",
                self.file(name),
                meta["run-id"],
            )
            return None
        self.node_state[name] = wire.to_array_record(state)
        return state

    def load_stored(self, name: str) -> tuple[AdapterState, dict[str, Any]] | None:
        """Entry ``name`` from the store with its metadata, or None when none was kept."""
        return read_entry(self.store, name)

    def save(
        self,
        name: str,
        state: Mapping[str, np.ndarray],
        server_round: int,
        adapter_config: Mapping[str, Any] | None = None,
        keep_previous: bool = False,
    ) -> Path:
        """Keep ``state`` in the node state and (atomically) in the store.

        ``keep_previous`` first keeps the stored entry of an earlier round as
        ``<name>-previous`` (see :meth:`load`).
        """
        from flower_llm import wire

        self.node_state[name] = wire.to_array_record(dict(state))
        if keep_previous:
            stored = read_entry(self.store, name)
            if stored is not None and stored[1]["last-round"] < server_round:
                old_state, old_meta = stored
                write_entry(
                    self.store,
                    previous_name(name),
                    old_state,
                    old_meta["run-id"],
                    old_meta["last-round"],
                )
        return write_entry(self.store, name, state, self.run_id, server_round, adapter_config)

    def file(self, name: str) -> Path:
        """The store's file of entry ``name``."""
        return self.store.directory / f"{name}.safetensors"


def previous_name(name: str) -> str:
    """The entry that keeps what entry ``name`` held before its last round."""
    return f"{name}-previous"


def stash_for(context: Any, session: ClientSession) -> PersonalStash:
    """The stash of the site a ClientApp ``context`` serves (its node state and store)."""
    from flower_llm.site_state import run_key, site_state_dir

    store = SiteStateStore(
        site_state_dir(context.node_config),
        run_key(session.cfg.output.run_name, context.run_id),
        session.site.key(),
    )
    return PersonalStash(
        context.state.array_records, store, context.run_id, session.cfg.output.resume
    )


def write_entry(
    store: SiteStateStore,
    name: str,
    state: Mapping[str, np.ndarray],
    run_id: int,
    server_round: int,
    adapter_config: Mapping[str, Any] | None = None,
) -> Path:
    """One safetensors file holding ``state``; its metadata names run, round and config."""
    from safetensors.numpy import save

    metadata = {
        "format": _FORMAT,
        "name": name,
        "run-id": str(int(run_id)),
        "last-round": str(int(server_round)),
    }
    if adapter_config is not None:
        metadata["adapter-config"] = json.dumps(dict(adapter_config), sort_keys=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    return store.write_bytes(f"{name}.safetensors", save(tensors, metadata=metadata))


def read_entry(store: SiteStateStore, name: str) -> tuple[AdapterState, dict[str, Any]] | None:
    """``(state, metadata)`` of entry ``name``; None when it was never written.

    Raises
    ------
    SiteStateError
        The file exists but is not a personal-adapter entry of that name (names the file).
    """
    from safetensors.numpy import load

    from flower_llm.checkpoint import _safetensors_metadata

    filename = f"{name}.safetensors"
    payload = store.read_bytes(filename)
    if payload is None:
        return None
    path = store.directory / filename
    try:
        metadata = _safetensors_metadata(payload)
        state = {k: np.asarray(v, np.float32) for k, v in load(payload).items()}
        meta: dict[str, Any] = {
            "run-id": int(metadata["run-id"]),
            "last-round": int(metadata["last-round"]),
        }
        if "adapter-config" in metadata:
            meta["adapter-config"] = json.loads(metadata["adapter-config"])
    except Exception as err:  # safetensors, json and int() each raise their own types
        raise SiteStateError(f"personal state {path} cannot be read (corrupt?): {err}") from err
    if metadata.get("format") != _FORMAT or metadata.get("name") != name:
        raise SiteStateError(
            f"personal state {path} is not a {name!r} entry "
            f"(format {metadata.get('format')!r}, name {metadata.get('name')!r})"
        )
    return state, meta


# --------------------------------------------------------------------------------------
# The site's side: local-b rounds, the end-of-run comparison
# --------------------------------------------------------------------------------------


class LocalB:
    """A ``local-b`` site: trains the global A with its own B, keeps B, sends A."""

    def __init__(self, session: ClientSession, stash: PersonalStash) -> None:
        self.session = session
        self.stash = stash

    def own_b(self, server_round: int | None = None) -> AdapterState:
        """The B this site trained last (before ``server_round``), or PEFT's initial B."""
        from flower_llm.adapters import adapter_state

        kept = self.stash.load(PERSONAL_B, before_round=server_round)
        return kept if kept is not None else zero_b(adapter_state(self.session.model))

    def start(
        self, shared: Mapping[str, np.ndarray], server_round: int | None = None
    ) -> AdapterState:
        """The adapter this site trains or evaluates: the received A with its own B.

        A received state that already holds B (another site's local-only adapter sent for
        evaluation) is used as it is.
        """
        if any(not is_lora_a(k) for k in shared):
            return dict(shared)
        return {**self.own_b(server_round), **shared}

    def keep(self, trained: Mapping[str, np.ndarray], server_round: int) -> None:
        """Keep the B matrices of ``trained``, this site's alone."""
        self.stash.save(PERSONAL_B, kept_part(trained, "local-b"), server_round, keep_previous=True)


def local_b_trainer(trainer: SiteTrainer, stash: PersonalStash) -> LocalBTrainer:
    """The SecAgg+ client's trainer under ``local-b`` (see :class:`LocalBTrainer`)."""
    return LocalBTrainer(LocalB(trainer.session, stash), trainer)


class LocalBTrainer:
    """``train`` as the SecAgg+ client needs it: from the global A, back the trained A.

    Only A enters the secure sum; the trained B is kept at the site. Training is the
    site's own (:class:`~flower_llm.client.SiteTrainer`: DP-SGD when the run has it).
    """

    def __init__(self, site: LocalB, trainer: SiteTrainer) -> None:
        self.site = site
        self.trainer = trainer
        self.cfg = site.session.cfg

    def train(self, global_state: AdapterState, server_round: int, learning_rate: float) -> Any:
        """Train ``global A + own B``; keep B; return the trained A and the stats."""
        state, stats = self.trainer.train(
            self.site.start(global_state, server_round), server_round, learning_rate
        )
        self.site.keep(state, server_round)
        return shared_part(state, "local-b"), stats

    def train_reply_metrics(self, stats: TrainStats) -> Mapping[str, object]:
        """The counts a train reply reports (held and seen): the site's."""
        return self.trainer.train_reply_metrics(stats)


def finetune(
    session: ClientSession, global_state: Mapping[str, np.ndarray], final_round: int
) -> AdapterState:
    """The final global adapter fine-tuned for ``personal.local-steps`` on this site's data.

    Batches are drawn as for round ``final_round + 1`` (a round the run never trains), at
    ``personal.learning-rate`` (0: ``train.learning-rate``); no DP-SGD here: the result
    never leaves the site.
    """
    cfg = session.cfg
    state, _ = session.train(
        dict(global_state),
        final_round + 1,
        cfg.personal.learning_rate or cfg.train.learning_rate,
        steps=cfg.personal.local_steps,
    )
    return state


def adapter_config_dict(session: ClientSession) -> dict[str, Any]:
    """The PEFT config of the session's adapter as JSON-able values (for export)."""
    from flower_llm.adapters import _jsonable, portable_base_name

    config = session.model.peft_config["default"]
    values = _jsonable(config.to_dict())
    values["base_model_name_or_path"] = portable_base_name(config.base_model_name_or_path)
    return dict(values)


def compare_on_site(
    session: ClientSession,
    stash: PersonalStash,
    received: Mapping[str, np.ndarray],
    local_only: Mapping[str, np.ndarray] | None,
    final_round: int,
    site_tasks: Sequence[Task] = (),
) -> dict[str, float | int]:
    """Held-out loss and token accuracy of this site's local-only, global and personal
    adapters on its own evaluation split, and their answers to the site's task files
    (``site_tasks``, as round evaluation asks them); the personal adapter is kept for
    export.

    Task results travel as counts: ``task-questions/<task>`` and
    ``task-chance-sum/<task>`` once, ``task-correct/<adapter>/<task>`` per adapter.

    ``received`` is what the server sent: the final global adapter (its A alone under
    ``local-b``, where the global adapter is that A with PEFT's initial B, zero: the base
    model's output; no other global B exists).
    """
    personalization = session.cfg.fed.personalization
    personal: AdapterState | None = None
    if personalization == "local-b":
        site = LocalB(session, stash)
        global_state = {**zero_b(received_template(session)), **received}
        personal = site.start(received)
    elif personalization == "finetune":
        global_state = dict(received)
        personal = finetune(session, global_state, final_round)
    else:
        global_state = dict(received)
    if personal is not None:
        path = stash.save(PERSONAL_ADAPTER, personal, final_round, adapter_config_dict(session))
        log.info("Personal adapter kept at %s", path)
    scores: dict[str, float | int] = {}
    tokens = examples = 0
    for name, state in (
        ("local-only", local_only),
        ("global", global_state),
        ("personal", personal),
    ):
        if state is None:
            continue
        stats = session.evaluate(dict(state))
        scores[f"eval-loss/{name}"] = stats.loss
        scores[f"eval-token-accuracy/{name}"] = stats.token_accuracy
        tokens, examples = stats.tokens, stats.examples
        if site_tasks:  # the adapter just evaluated is still loaded
            from flower_llm import tasks

            for score in tasks.site_task_scores(
                session.model, session.base.tokenizer, session.cfg, site_tasks
            ):
                scores[f"{tasks.QUESTIONS_KEY}/{score.name}"] = score.questions
                scores[f"{tasks.CHANCE_SUM_KEY}/{score.name}"] = score.chance_sum
                scores[f"{tasks.CORRECT_KEY}/{name}/{score.name}"] = score.correct
    scores["eval-tokens"] = tokens
    scores["num-examples"] = examples
    return scores


def received_template(session: ClientSession) -> AdapterState:
    """The session's adapter arrays (shapes of every key, A and B)."""
    from flower_llm.adapters import adapter_state

    return adapter_state(session.model)


# --------------------------------------------------------------------------------------
# The server's side: the per-site table
# --------------------------------------------------------------------------------------


def per_site_table(scores_by_site: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """summary.json's ``per-site`` section from each site's reply scores.

    ``{"sites": {label: {"local-only": loss, "global": loss, "personal": loss, ...}},
    "personal-beats-global-everywhere": bool, "personal-beats-local-only-everywhere": bool}``
    (a comparison is false when a site lacks either loss).
    """
    sites: dict[str, dict[str, Any]] = {}
    for label, scores in sorted(scores_by_site.items()):
        row: dict[str, Any] = {}
        for name in ADAPTERS:
            row[name] = _number(scores.get(f"eval-loss/{name}"))
            row[f"token-accuracy/{name}"] = _number(scores.get(f"eval-token-accuracy/{name}"))
        row["eval-tokens"] = int(scores.get("eval-tokens", 0))
        row.update(task_columns(scores))
        sites[label] = row

    def beats(other: str) -> bool:
        return bool(sites) and all(
            row["personal"] is not None and row[other] is not None and row["personal"] < row[other]
            for row in sites.values()
        )

    return {
        "sites": sites,
        "personal-beats-global-everywhere": beats("global"),
        "personal-beats-local-only-everywhere": beats("local-only"),
    }


def comparison_problem(scores: Mapping[str, Any]) -> str | None:
    """Why a site's task counts in its comparison reply are impossible, or None.

    Per task: ``task-questions`` a whole number >= 1, ``task-chance-sum`` and every
    adapter's ``task-correct`` (whole) within [0, questions]; a correct count without its
    questions is refused too.
    """
    from flower_llm.tasks import CHANCE_SUM_KEY, CORRECT_KEY, QUESTIONS_KEY

    for key, value in scores.items():
        if not key.startswith(f"{CORRECT_KEY}/") and not key.startswith(f"{CHANCE_SUM_KEY}/"):
            continue
        task = key.rsplit("/", 1)[1]
        questions = scores.get(f"{QUESTIONS_KEY}/{task}")
        if not (
            isinstance(questions, int | float)
            and float(questions).is_integer()
            and 1 <= questions <= 2**53
        ):
            return f"task {task!r}: questions {questions!r} is not a whole number >= 1"
        if not (isinstance(value, int | float) and 0 <= value <= questions):
            return f"metric '{key}' = {value!r} is outside [0, {questions}]"
        if key.startswith(f"{CORRECT_KEY}/") and not float(value).is_integer():
            return f"metric '{key}' = {value!r} is not a whole count"
    return None


def task_columns(scores: Mapping[str, Any]) -> dict[str, float]:
    """A site's task columns: ``task-accuracy/<adapter>/<task>`` = correct / questions and
    ``task-chance/<task>`` = chance sum / questions (uniform guessing), from its counts."""
    from flower_llm.tasks import CHANCE_SUM_KEY, CORRECT_KEY, QUESTIONS_KEY

    out: dict[str, float] = {}
    for key, value in sorted(scores.items()):
        if key.startswith(f"{QUESTIONS_KEY}/"):
            task = key.split("/", 1)[1]
            chance = scores.get(f"{CHANCE_SUM_KEY}/{task}")
            if isinstance(chance, int | float) and value:
                out[f"task-chance/{task}"] = float(chance) / float(value)
            for name in ADAPTERS:
                correct = scores.get(f"{CORRECT_KEY}/{name}/{task}")
                if isinstance(correct, int | float) and value:
                    out[f"task-accuracy/{name}/{task}"] = float(correct) / float(value)
    return out


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def format_table(per_site: Mapping[str, Any]) -> list[str]:
    """The per-site table as text lines (the end-of-run report, ``flower-llm report``)."""
    sites: Mapping[str, Mapping[str, Any]] = per_site.get("sites", {})
    if not sites:
        return []
    width = max(len("site"), *(len(s) for s in sites))
    lines = [
        "held-out loss on each site's own data (lower is better):",
        f"  {'site':<{width}}  {'local-only':>10}  {'global':>10}  {'personal':>10}",
    ]
    for label, row in sites.items():
        cells = [f"{row[n]:10.4f}" if row.get(n) is not None else f"{'n/a':>10}" for n in ADAPTERS]
        lines.append(f"  {label:<{width}}  " + "  ".join(cells))
    lines.extend(_task_table(sites, width))
    lines.append(
        f"  personal beats global at every site: "
        f"{'yes' if per_site.get('personal-beats-global-everywhere') else 'no'}; "
        f"beats local-only at every site: "
        f"{'yes' if per_site.get('personal-beats-local-only-everywhere') else 'no'}"
    )
    return lines


def _task_table(sites: Mapping[str, Mapping[str, Any]], width: int) -> list[str]:
    """Task accuracy rows (site, task), when any site answered a task file."""
    rows = [
        (label, key.split("/", 1)[1], row)
        for label, row in sites.items()
        for key in row
        if key.startswith("task-chance/")
    ]
    if not rows:
        return []
    task_width = max(len("task"), *(len(task) for _, task, _ in rows))
    lines = [
        "task accuracy on each site's own task file (higher is better):",
        f"  {'site':<{width}}  {'task':<{task_width}}  {'local-only':>10}  {'global':>10}  "
        f"{'personal':>10}  {'chance':>10}",
    ]
    for label, task, row in rows:
        values = [row.get(f"task-accuracy/{n}/{task}") for n in ADAPTERS]
        values.append(row.get(f"task-chance/{task}"))
        cells = [f"{v:10.3f}" if v is not None else f"{'n/a':>10}" for v in values]
        lines.append(f"  {label:<{width}}  {task:<{task_width}}  " + "  ".join(cells))
    return lines


# --------------------------------------------------------------------------------------
# Export, at the site
# --------------------------------------------------------------------------------------


def export_personal(
    site_state_dir: str | Path | None, run: str, site: str | None, out: str | Path
) -> Path:
    """Write a site's kept personal adapter to ``out`` in PEFT format.

    ``site`` may be left out when the run's directory holds one site only.

    Raises
    ------
    FileNotFoundError
        No such run or site, or the site kept no personal adapter (the run had
        ``fed.personalization = none``, or has not finished).
    ValueError
        ``out`` exists and is not empty, or several sites and none chosen.
    """
    from peft import LoraConfig

    from flower_llm.adapters import save_adapter
    from flower_llm.site_state import default_site_state_dir, run_key

    root = Path(site_state_dir).expanduser() if site_state_dir else default_site_state_dir()
    run_dir = root / run_key(run, 0)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no site state for run {run!r} under {root}")
    if site is None:
        sites = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
        if len(sites) != 1:
            raise ValueError(
                f"{run_dir} holds {len(sites)} sites ({', '.join(sites) or 'none'}): "
                "name one with --site"
            )
        site = sites[0]
    store = SiteStateStore(root, run_dir.name, site)
    entry = read_entry(store, PERSONAL_ADAPTER)
    if entry is None:
        raise FileNotFoundError(
            f"site {site!r} of run {run!r} kept no personal adapter "
            f"({store.directory / (PERSONAL_ADAPTER + '.safetensors')}): the run had "
            "fed.personalization = none, or did not reach its end-of-run comparison"
        )
    state, meta = entry
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not empty: choose a new directory")
    values = dict(meta.get("adapter-config", {}))
    known = {f for f in LoraConfig.__dataclass_fields__}
    config = LoraConfig(**{k: v for k, v in values.items() if k in known})
    save_adapter(state, config, target)
    log.info("Personal adapter of %s (run %s, round %d): %s", site, run, meta["last-round"], target)
    return target
