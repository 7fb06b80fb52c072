"""Typed settings, parsed once from Flower's flat run-config.

Flower hands apps a flat ``dict[str, bool | int | float | str]`` whose keys are the
dotted, kebab-case names declared under ``[tool.flwr.app.config]`` (``lora.r``,
``train.local-steps``). :func:`parse_run_config` turns it into frozen dataclasses at the
edge of each app, before any model loads, so that an unknown key or a bad value fails
at start-up with the key named.

Each field carries its run-config key and its help text in ``metadata``; the README's
config reference is generated from them (:func:`config_reference_markdown`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

Scalar = bool | int | float | str

EMBEDDED = "embedded"
"""Value of ``model.name`` / ``data.source`` that selects the offline default."""

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
PARTITIONERS = ("iid", "dirichlet", "by-field", "none")
LR_SCHEDULES = ("constant", "cosine", "linear")
WEIGHTINGS = ("examples", "tokens", "seen", "uniform")
WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8", "nf4")
# flower_llm.compression.COMPRESSED_CODECS: formats that send updates, with error feedback.
COMPRESSED_WIRE_DTYPES = ("bfloat16", "int8", "nf4")
WIRE_LAYOUTS = ("packed", "arrays")
AGGREGATIONS = ("fedavg", "secagg+")
PERSONALIZATIONS = ("none", "local-b", "finetune")
BOUND_ACTIONS = ("drop", "clamp")
UPDATE_BOUNDS = ("adamw", "off")
ROBUST_RULES = ("none", "norm-bound", "trimmed-mean", "median")
LORA_AGGREGATIONS = ("fedavg", "ffa", "exact")
DP_MODES = ("off", "server-fixed", "server-adaptive", "client-fixed")
# flower_llm.privacy.accounting.ACCOUNTANTS, repeated so parsing a config loads no maths.
ACCOUNTANTS = ("pld", "rdp")
SMALL_COHORT_POLICIES = ("refuse", "account")


class ConfigError(ValueError):
    """A run-config key is unknown or its value is invalid."""


def setting(default: Any, key: str, help: str) -> Any:
    """Declare a dataclass field bound to run-config ``key`` with its help text."""
    return field(default=default, metadata={"key": key, "help": help})


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"run-config '{key}' = {value!r}: {message}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"must be one of {', '.join(allowed)}", value)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The base causal LM and how it is quantized."""

    name: str = setting(
        EMBEDDED,
        "model.name",
        "Hugging Face hub id or local directory of a causal LM; `embedded` builds the "
        "tiny offline Llama that the default run uses.",
    )
    quantization: str = setting(
        "nf4",
        "model.quantization",
        "Base weight quantization through bitsandbytes: nf4 | fp4 | int8 | none.",
    )
    double_quant: bool = setting(
        True, "model.double-quant", "Quantize the 4-bit quantization constants too."
    )
    compute_dtype: str = setting(
        "bfloat16",
        "model.compute-dtype",
        "dtype of matmuls and LoRA weights: bfloat16 | float16 | float32.",
    )
    gradient_checkpointing: bool = setting(
        False,
        "model.gradient-checkpointing",
        "Recompute activations in backward to save memory (slower).",
    )
    fp32_stream: bool = setting(
        True,
        "model.fp32-stream",
        "With a quantized base, upcast its other weights (embeddings, norms, lm_head) to "
        "fp32 as peft's prepare_model_for_kbit_training does, so activations and attention "
        "run in fp32. `false` keeps them in `model.compute-dtype`: about half the "
        "activation memory, and SDPA's fused attention kernels on CUDA.",
    )

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model.name", "must not be empty", self.name)
        _one_of("model.quantization", self.quantization, QUANTIZATIONS)
        _one_of("model.compute-dtype", self.compute_dtype, COMPUTE_DTYPES)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters: the only weights that train and travel."""

    r: int = setting(16, "lora.r", "Rank of the LoRA update matrices.")
    alpha: int = setting(32, "lora.alpha", "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = setting(0.0, "lora.dropout", "Dropout on the LoRA input, in [0, 1).")
    target_modules: str = setting(
        "all-linear",
        "lora.target-modules",
        "Comma-separated module names to adapt (e.g. `q_proj,v_proj`) or `all-linear`.",
    )
    aggregation: str = setting(
        "fedavg",
        "lora.aggregation",
        "How the server combines the sites' LoRA factors: `fedavg` (A and B averaged "
        "apart; avg(B) avg(A) is not the average of the products), `ffa` (A frozen at its "
        "seeded init, only B trained and sent: exact, half the upload) or `exact` (the "
        "weighted average of the products B_k A_k, re-factored to rank `lora.r` by a "
        "truncated SVD; error reported per round).",
    )
    site_ranks: str = setting(
        "",
        "lora.site-ranks",
        "Simulation: comma-separated LoRA ranks by partition id, cycled (e.g. `4,8,16`); "
        "empty = every site at `lora.r`. A SuperNode's node-config `lora-r` sets its own. "
        "Each at most `lora.r`; needs `lora.aggregation = exact`.",
    )

    def __post_init__(self) -> None:
        _require(self.r > 0, "lora.r", "must be a positive integer", self.r)
        _one_of("lora.aggregation", self.aggregation, LORA_AGGREGATIONS)
        try:
            ranks = self.ranks_by_partition
        except ValueError:
            ranks = ()
            _require(False, "lora.site-ranks", "must be comma-separated integers", self.site_ranks)
        _require(
            all(0 < r <= self.r for r in ranks),
            "lora.site-ranks",
            f"each rank must be in [1, lora.r = {self.r}]",
            self.site_ranks,
        )
        _require(
            not ranks or self.aggregation == "exact",
            "lora.site-ranks",
            "needs lora.aggregation = 'exact' (only products of different ranks average)",
            self.site_ranks,
        )
        _require(self.alpha > 0, "lora.alpha", "must be positive", self.alpha)
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)", self.dropout)
        _require(bool(self.modules), "lora.target-modules", "names no module", self.target_modules)

    @property
    def ranks_by_partition(self) -> tuple[int, ...]:
        """``lora.site-ranks`` as integers (empty when unset)."""
        return tuple(int(r) for r in self.site_ranks.split(",") if r.strip())

    def site_rank(self, partition_id: int, node_rank: int | None = None) -> int:
        """The LoRA rank of a site: node-config ``lora-r``, else its partition's, else ``r``.

        Raises
        ------
        ConfigError
            The node's rank is outside ``[1, lora.r]`` or differs from ``lora.r`` without
            ``lora.aggregation = exact``.
        """
        ranks = self.ranks_by_partition
        if node_rank is None:
            return ranks[partition_id % len(ranks)] if ranks else self.r
        if not 0 < node_rank <= self.r:
            raise ConfigError(
                f"node-config 'lora-r' = {node_rank}: must be in [1, lora.r = {self.r}]"
            )
        if node_rank != self.r and self.aggregation != "exact":
            raise ConfigError(
                f"node-config 'lora-r' = {node_rank}: a rank other than lora.r = {self.r} "
                "needs lora.aggregation = 'exact'"
            )
        return node_rank

    @property
    def modules(self) -> str | list[str]:
        """Target modules in the form peft's ``LoraConfig`` takes."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass(frozen=True)
class DataConfig:
    """Where each client's instruction data comes from and how it becomes tokens."""

    source: str = setting(
        EMBEDDED,
        "data.source",
        "`embedded` (bundled medical/finance/smart-home Q&A), a local .json/.jsonl/.csv/"
        ".parquet file, or a Hugging Face dataset id. A SuperNode's node-config "
        "`data-path` overrides it for that site.",
    )
    split: str = setting("train", "data.split", "Split to read from a hub dataset.")
    instruction_column: str = setting(
        "instruction", "data.instruction-column", "Column holding the prompt/question."
    )
    response_column: str = setting(
        "response", "data.response-column", "Column holding the target answer."
    )
    prompt_template: str = setting(
        "### Instruction:\n{instruction}\n\n### Response:\n",
        "data.prompt-template",
        "Python format string with `{instruction}` that precedes the response.",
    )
    use_chat_template: bool = setting(
        False,
        "data.use-chat-template",
        "Format with the tokenizer's chat template instead of `data.prompt-template`.",
    )
    partitioner: str = setting(
        "by-field",
        "data.partitioner",
        "How simulation splits one dataset across virtual clients: iid | dirichlet | "
        "by-field | none (every node uses the whole source, as a real site does).",
    )
    partition_by: str = setting(
        "domain",
        "data.partition-by",
        "Column that `by-field` and `dirichlet` partition on.",
    )
    dirichlet_alpha: float = setting(
        0.5, "data.dirichlet-alpha", "Concentration of the Dirichlet partitioner (> 0)."
    )
    eval_fraction: float = setting(
        0.2, "data.eval-fraction", "Held-out fraction of each client's data, in (0, 1)."
    )
    max_seq_length: int = setting(
        128, "data.max-seq-length", "Tokens per example after truncation."
    )

    def __post_init__(self) -> None:
        _require(bool(self.source.strip()), "data.source", "must not be empty", self.source)
        _one_of("data.partitioner", self.partitioner, PARTITIONERS)
        _require(
            "{instruction}" in self.prompt_template or self.use_chat_template,
            "data.prompt-template",
            "must contain the placeholder {instruction}",
            self.prompt_template,
        )
        _require(
            self.dirichlet_alpha > 0, "data.dirichlet-alpha", "must be > 0", self.dirichlet_alpha
        )
        _require(
            0.0 < self.eval_fraction < 1.0,
            "data.eval-fraction",
            "must be in (0, 1)",
            self.eval_fraction,
        )
        _require(
            self.max_seq_length >= 8, "data.max-seq-length", "must be >= 8", self.max_seq_length
        )


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    local_steps: int = setting(20, "train.local-steps", "Optimizer steps per client per round.")
    batch_size: int = setting(8, "train.batch-size", "Examples per micro-batch.")
    grad_accum: int = setting(
        1, "train.grad-accum", "Micro-batches accumulated into one optimizer step."
    )
    learning_rate: float = setting(3e-3, "train.learning-rate", "Peak AdamW learning rate.")
    lr_schedule: str = setting(
        "cosine",
        "train.lr-schedule",
        "How the learning rate moves across rounds: constant | cosine | linear "
        "(decays towards `train.lr-min`).",
    )
    lr_min: float = setting(1e-3, "train.lr-min", "Learning rate of the last round.")
    weight_decay: float = setting(0.0, "train.weight-decay", "AdamW weight decay.")
    max_grad_norm: float = setting(
        1.0, "train.max-grad-norm", "Per-step gradient clipping of local training (0 = off)."
    )

    def __post_init__(self) -> None:
        for key, value in (
            ("train.local-steps", self.local_steps),
            ("train.batch-size", self.batch_size),
            ("train.grad-accum", self.grad_accum),
        ):
            _require(value > 0, key, "must be a positive integer", value)
        _require(self.learning_rate > 0, "train.learning-rate", "must be > 0", self.learning_rate)
        _one_of("train.lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _require(
            0 <= self.lr_min <= self.learning_rate,
            "train.lr-min",
            "must be in [0, train.learning-rate]",
            self.lr_min,
        )
        _require(self.weight_decay >= 0, "train.weight-decay", "must be >= 0", self.weight_decay)
        _require(self.max_grad_norm >= 0, "train.max-grad-norm", "must be >= 0", self.max_grad_norm)

    def learning_rate_at(self, server_round: int, num_rounds: int) -> float:
        """Learning rate for ``server_round`` (1-based) of ``num_rounds``."""
        if self.lr_schedule == "constant" or num_rounds <= 1:
            return self.learning_rate
        progress = (server_round - 1) / (num_rounds - 1)
        if self.lr_schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr_min + (self.learning_rate - self.lr_min) * shape


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, client sampling and aggregation on the server."""

    num_rounds: int = setting(3, "fed.num-rounds", "Federated rounds.")
    fraction_train: float = setting(
        1.0, "fed.fraction-train", "Fraction of connected clients sampled to train, in (0, 1]."
    )
    fraction_evaluate: float = setting(
        1.0, "fed.fraction-evaluate", "Fraction of clients sampled to evaluate, in (0, 1]."
    )
    evaluate_every: int = setting(
        1,
        "fed.evaluate-every",
        "Evaluate the global adapter on the sites' held-out splits after every N-th round; "
        "the last round of a run is always evaluated.",
    )
    min_train_clients: int = setting(
        2, "fed.min-train-clients", "Fewest valid train replies a round needs to update the model."
    )
    min_evaluate_clients: int = setting(
        1, "fed.min-evaluate-clients", "Fewest clients sampled for evaluation."
    )
    min_available_clients: int = setting(
        2, "fed.min-available-clients", "Clients that must be connected before a round starts."
    )
    round_timeout: float = setting(
        600.0, "fed.round-timeout", "Seconds to wait for replies; later clients are dropped."
    )
    weighting: str = setting(
        "examples",
        "fed.weighting",
        "FedAvg weight n_k of each site: `examples` (training examples it holds), `tokens` "
        "(response tokens it holds), `seen` (examples it trained on this round) or `uniform`.",
    )
    wire_dtype: str = setting(
        "float32",
        "fed.wire-dtype",
        "Format of adapters on the wire, both directions, every round: float32 | float16 "
        "(whole adapters) | bfloat16 | int8 | nf4 (updates: int8 and nf4 blockwise with one "
        "float32 absmax scale per `fed.wire-block-size` values; see docs/aggregation.md).",
    )
    wire_layout: str = setting(
        "packed",
        "fed.wire-layout",
        "How the server sends an adapter (or compressed update) on the Message API: `packed` "
        "(one array per record plus a small layout header: a few Flower objects a message) or "
        "`arrays` (one Flower array per tensor, what a stock Flower strategy reads). Sites "
        "reply in the layout they received. Not used by SecAgg+ (its own masked vector).",
    )
    wire_block_size: int = setting(
        64,
        "fed.wire-block-size",
        "Values per absmax scale of int8 and nf4 (64 as QLoRA's NF4; bytes per value "
        "1 + 4/B for int8, 1/2 + 4/B for nf4).",
    )
    error_feedback: bool = setting(
        True,
        "fed.error-feedback",
        "With bfloat16, int8 or nf4: add what quantization lost to the next update (sites "
        "and server each keep a residual).",
    )
    initial_from_seed: bool = setting(
        True,
        "fed.initial-from-seed",
        "While the global adapter is still the run's seeded initial one (round 0's evaluation, "
        "round 1), send sites a small `initial` instruction instead of its arrays: each site "
        "rebuilds it from `seed` on the model it trains and checks the server's digest; a "
        "site that cannot (another torch version, other settings) answers an error naming "
        "the difference and is sent the arrays. `false`: always the arrays (a ClientApp "
        "other than this project's).",
    )
    max_weight: float = setting(
        0.0,
        "fed.max-weight",
        "Largest weight a reply may claim (0 = derived: local-steps x grad-accum x batch-size "
        "for `seen`, 1 for `uniform`, 2^24 examples or 2^24 x (max-seq-length - 1) tokens "
        "held; SecAgg+ with examples/tokens needs it set: the largest n_k any site holds). A "
        "larger claim is dropped, or clamped with `fed.bound-action = clamp` (always clamped "
        "under SecAgg+, which cannot see a claim).",
    )
    update_bound: str = setting(
        "adamw",
        "fed.update-bound",
        "Per-value bound on a site's update |local - global|: `adamw` (derived from the "
        "round's learning rate and local AdamW steps, as SecAgg+ does) or `off`.",
    )
    max_update_norm: float = setting(
        0.0,
        "fed.max-update-norm",
        "L2 bound on one site's whole update (0 = none).",
    )
    bound_action: str = setting(
        "drop",
        "fed.bound-action",
        "A reply beyond `fed.max-weight`, `fed.update-bound` or `fed.max-update-norm`: "
        "`drop` it (reason in metrics.jsonl) or `clamp` it to the bound.",
    )
    robust: str = setting(
        "none",
        "fed.robust",
        "Aggregation rule over the accepted updates: none (weighted FedAvg) | norm-bound "
        "(every update scaled to at most the round's median update norm, then FedAvg) | "
        "trimmed-mean (per value, unweighted, `fed.trim-fraction` cut at each end) | median "
        "(per value, unweighted). See docs/aggregation.md.",
    )
    trim_fraction: float = setting(
        0.2,
        "fed.trim-fraction",
        "Fraction of the replies cut at each end per value by `fed.robust = trimmed-mean`, "
        "in [0, 0.5).",
    )
    aggregation: str = setting(
        "fedavg", "fed.aggregation", "fedavg, or secagg+ (the server only sees the sum)."
    )
    personalization: str = setting(
        "none",
        "fed.personalization",
        "Per-site adapters (docs/personalization.md): `none`, `local-b` (FedSA-LoRA: the A "
        "matrices are federated, each site keeps its own B, which never leaves it) or "
        "`finetune` (after the last round each site fine-tunes the global adapter for "
        "`personal.local-steps` steps). Each site then reports the held-out loss of its "
        "local-only, global and personal adapters (scores only).",
    )

    def __post_init__(self) -> None:
        _require(
            self.num_rounds > 0, "fed.num-rounds", "must be a positive integer", self.num_rounds
        )
        for key, value in (
            ("fed.fraction-train", self.fraction_train),
            ("fed.fraction-evaluate", self.fraction_evaluate),
        ):
            _require(0.0 < value <= 1.0, key, "must be in (0, 1]", value)
        for key, count in (
            ("fed.evaluate-every", self.evaluate_every),
            ("fed.min-train-clients", self.min_train_clients),
            ("fed.min-evaluate-clients", self.min_evaluate_clients),
            ("fed.min-available-clients", self.min_available_clients),
        ):
            _require(count >= 1, key, "must be >= 1", count)
        _require(
            self.round_timeout > 0, "fed.round-timeout", "must be > 0 seconds", self.round_timeout
        )
        _one_of("fed.weighting", self.weighting, WEIGHTINGS)
        _one_of("fed.wire-dtype", self.wire_dtype, WIRE_DTYPES)
        _one_of("fed.wire-layout", self.wire_layout, WIRE_LAYOUTS)
        _require(
            2 <= self.wire_block_size <= 2**20,
            "fed.wire-block-size",
            "must be in [2, 2^20]",
            self.wire_block_size,
        )
        _require(
            math.isfinite(self.max_weight) and self.max_weight >= 0,
            "fed.max-weight",
            "must be finite and >= 0 (0 = derived)",
            self.max_weight,
        )
        _one_of("fed.update-bound", self.update_bound, UPDATE_BOUNDS)
        _require(
            math.isfinite(self.max_update_norm) and self.max_update_norm >= 0,
            "fed.max-update-norm",
            "must be finite and >= 0 (0 = none)",
            self.max_update_norm,
        )
        _one_of("fed.bound-action", self.bound_action, BOUND_ACTIONS)
        _one_of("fed.robust", self.robust, ROBUST_RULES)
        _require(
            0.0 <= self.trim_fraction < 0.5,
            "fed.trim-fraction",
            "must be in [0, 0.5)",
            self.trim_fraction,
        )
        _one_of("fed.aggregation", self.aggregation, AGGREGATIONS)
        _one_of("fed.personalization", self.personalization, PERSONALIZATIONS)

    def evaluates(self, server_round: int) -> bool:
        """Whether round ``server_round`` ends with a federated evaluation."""
        return server_round % self.evaluate_every == 0 or server_round == self.num_rounds


@dataclass(frozen=True)
class OutputConfig:
    """What the server writes."""

    dir: str = setting(
        "outputs",
        "output.dir",
        "Directory for per-round adapters, metrics.jsonl and summary.json (a run gets a "
        "sub-directory named by its start time unless `output.run-name` is set).",
    )
    run_name: str = setting("", "output.run-name", "Fixed run sub-directory name (optional).")
    local_only_baseline: bool = setting(
        False,
        "output.local-only-baseline",
        "Also train a local-only adapter per client and report, on the union of all "
        "held-out data, its loss next to the federated one. Clients then send their "
        "local-only adapter once at the end: use it for benchmarking, not in production.",
    )
    resume: bool = setting(
        False,
        "output.resume",
        "Continue the run in `output.dir`/`output.run-name` from its last completed round "
        "(its checkpoint.safetensors) instead of starting over; needs `output.run-name` "
        "and the same model, lora, data, train, fed, privacy settings and seed.",
    )

    def __post_init__(self) -> None:
        _require(
            not self.resume or bool(self.run_name.strip()),
            "output.run-name",
            "must name the run to continue when output.resume = true",
            self.run_name,
        )


@dataclass(frozen=True)
class PersonalConfig:
    """The personal adapter each site keeps (``fed.personalization``)."""

    local_steps: int = setting(
        20,
        "personal.local-steps",
        "`fed.personalization = finetune`: optimizer steps each site fine-tunes the final "
        "global adapter on its own training data.",
    )
    learning_rate: float = setting(
        0.0,
        "personal.learning-rate",
        "`fed.personalization = finetune`: constant learning rate of the fine-tune "
        "(0 = `train.learning-rate`).",
    )

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "personal.local-steps", "must be >= 1", self.local_steps)
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate >= 0,
            "personal.learning-rate",
            "must be finite and >= 0 (0 = train.learning-rate)",
            self.learning_rate,
        )


@dataclass(frozen=True)
class EvalConfig:
    """Task evaluation at the sites (flower_llm.tasks): accuracy on questions, not only loss."""

    tasks: bool = setting(
        True,
        "eval.tasks",
        "Each evaluating site also answers its task file's questions with the global "
        "adapter and sends only the counts (questions, correct, chance): multiple-choice "
        "accuracy per task, pooled, next to its chance level. A site's task file is its "
        "node-config `task-file`, else `eval.task-file`, else (embedded data) the bundled "
        "task of the domain its partition holds; a site without one sends no task metrics.",
    )
    task_file: str = setting(
        "",
        "eval.task-file",
        "Comma-separated JSONL task files every site evaluates when its node-config names "
        "no `task-file` (empty = none; the embedded data uses its bundled tasks).",
    )

    def __post_init__(self) -> None:
        files = [f.strip() for f in self.task_file.split(",")]
        _require(
            self.task_file.strip() == "" or all(files),
            "eval.task-file",
            "has an empty entry between commas",
            self.task_file,
        )

    @property
    def task_files(self) -> list[str]:
        """``eval.task-file`` as a list of paths (empty when unset)."""
        return [f.strip() for f in self.task_file.split(",") if f.strip()]


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: client-level DP-FedAvg on the server, DP-SGD on the clients.

    See docs/privacy.md for what each mode protects and the assumptions of the accounting.
    """

    mode: str = setting(
        "off",
        "privacy.mode",
        "Client-level DP-FedAvg: off | server-fixed (the server clips each update) | "
        "server-adaptive (clip norm follows a quantile of update norms, Andrew et al. 2021) "
        "| client-fixed (clients clip, the server only adds noise).",
    )
    noise_multiplier: float = setting(
        1.0,
        "privacy.noise-multiplier",
        "Noise standard deviation of DP-FedAvg relative to the clip norm (>= 0); see "
        "`calibrate_noise_multiplier` to pick it for a target epsilon.",
    )
    clip_norm: float = setting(
        0.1,
        "privacy.clip-norm",
        "L2 bound on each client's adapter update (the initial bound in server-adaptive).",
    )
    target_epsilon: float = setting(
        0.0,
        "privacy.target-epsilon",
        "Stop before a round would take epsilon above this budget (0 = no budget stop).",
    )
    delta: float = setting(
        1e-5, "privacy.delta", "delta of the (epsilon, delta) guarantee, in (0, 1)."
    )
    accountant: str = setting(
        "pld",
        "privacy.accountant",
        "Accountant of the headline epsilon, the budget stop and DP-SGD: pld (privacy loss "
        "distributions, tighter) | rdp (Renyi DP); both epsilons are recorded.",
    )
    min_sampled_clients: int = setting(
        2,
        "privacy.min-sampled-clients",
        "Refuse to start when the expected clients per round (fed.fraction-train x "
        "connected clients) is below this: DP noise swamps small cohorts.",
    )
    small_cohorts: str = setting(
        "refuse",
        "privacy.small-cohorts",
        "SecAgg+ with client-level DP: a Poisson cohort below SecAgg+'s minimum of 3 releases "
        "noise alone, which the subsampled Gaussian does not cover; its chance is added to "
        "delta (dp-delta-total). refuse: do not start when that would exceed privacy.delta | "
        "account: run and report the larger delta.",
    )
    target_quantile: float = setting(
        0.5,
        "privacy.target-quantile",
        "server-adaptive: fraction of updates the clip norm should leave unclipped, in [0, 1].",
    )
    clip_learning_rate: float = setting(
        0.2,
        "privacy.clip-learning-rate",
        "server-adaptive: step size of the geometric clip-norm update (> 0).",
    )
    clipped_count_stddev: float = setting(
        0.0,
        "privacy.clipped-count-stddev",
        "server-adaptive: noise on the unclipped count (0 = expected clients / 20, as "
        "Andrew et al.); must exceed noise-multiplier / 2.",
    )
    dpsgd: bool = setting(
        False,
        "privacy.dpsgd",
        "Sample-level DP-SGD (Opacus) in each client's local training.",
    )
    dpsgd_noise_multiplier: float = setting(
        1.0, "privacy.dpsgd-noise-multiplier", "DP-SGD noise relative to the per-sample clip."
    )
    dpsgd_max_grad_norm: float = setting(
        1.0, "privacy.dpsgd-max-grad-norm", "DP-SGD per-sample gradient L2 bound (> 0)."
    )
    dpsgd_delta: float = setting(
        1e-5, "privacy.dpsgd-delta", "delta of each client's sample-level guarantee, in (0, 1)."
    )

    def __post_init__(self) -> None:
        _one_of("privacy.mode", self.mode, DP_MODES)
        _one_of("privacy.accountant", self.accountant, ACCOUNTANTS)
        _one_of("privacy.small-cohorts", self.small_cohorts, SMALL_COHORT_POLICIES)
        for key, value in (
            ("privacy.noise-multiplier", self.noise_multiplier),
            ("privacy.target-epsilon", self.target_epsilon),
            ("privacy.clipped-count-stddev", self.clipped_count_stddev),
            ("privacy.dpsgd-noise-multiplier", self.dpsgd_noise_multiplier),
        ):
            _require(math.isfinite(value) and value >= 0, key, "must be >= 0", value)
        for key, value in (
            ("privacy.clip-norm", self.clip_norm),
            ("privacy.clip-learning-rate", self.clip_learning_rate),
            ("privacy.dpsgd-max-grad-norm", self.dpsgd_max_grad_norm),
        ):
            _require(math.isfinite(value) and value > 0, key, "must be > 0", value)
        for key, value in (
            ("privacy.delta", self.delta),
            ("privacy.dpsgd-delta", self.dpsgd_delta),
        ):
            _require(0.0 < value < 1.0, key, "must be in (0, 1)", value)
        _require(
            self.min_sampled_clients >= 1,
            "privacy.min-sampled-clients",
            "must be >= 1",
            self.min_sampled_clients,
        )
        _require(
            0.0 <= self.target_quantile <= 1.0,
            "privacy.target-quantile",
            "must be in [0, 1]",
            self.target_quantile,
        )

    @property
    def client_level(self) -> bool:
        """Whether DP-FedAvg (client-level DP) is on."""
        return self.mode != "off"

    @property
    def enabled(self) -> bool:
        """Whether any DP mechanism (client- or sample-level) is on."""
        return self.client_level or self.dpsgd


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ (``fed.aggregation = "secagg+"``); 0 means derived from the run each round.

    See docs/security.md for what each setting trades and how the automatic values are found.
    """

    num_shares: int = setting(
        0,
        "secagg.num-shares",
        "SecAgg+ neighbours (itself included) each client secret-shares its keys with, >= 3 "
        "(0 = all sampled clients up to 32, ~4 log2 n beyond).",
    )
    reconstruction_threshold: int = setting(
        0,
        "secagg.reconstruction-threshold",
        "Shares needed to unmask a client; every client needs this many live neighbours, "
        "in [2, num-shares) (0 = a strict majority of num-shares).",
    )
    clipping_range: float = setting(
        0.0,
        "secagg.clipping-range",
        "Bound on every value of a client's adapter update, which clients clip to before "
        "masking (0 = the most one round of local AdamW can move a weight, x1.25).",
    )
    quantization_range: int = setting(
        0,
        "secagg.quantization-range",
        "Integer levels per value over [-clipping-range, clipping-range], in [2^16, 2^30] "
        "(0 = the largest power of two whose sum over the sampled clients fits 2^32).",
    )
    max_weight: float = setting(
        0.0,
        "secagg.max-weight",
        "W, the largest FedAvg weight a SecAgg+ client may report; larger ones are clamped "
        "to W (the server learns how many). 0 = fed.max-weight, which SecAgg+ requires with "
        "fed.weighting = examples or tokens (data held); for seen, local-steps x grad-accum "
        "x batch-size; 1 with client-level DP or uniform.",
    )
    timeout: float = setting(
        0.0,
        "secagg.timeout",
        "Seconds each of the four SecAgg+ stages waits for replies (0 = fed.round-timeout / "
        "4); a round never waits longer than fed.round-timeout in all.",
    )

    def __post_init__(self) -> None:
        _require(
            self.num_shares == 0 or self.num_shares >= 3,
            "secagg.num-shares",
            "must be 0 (auto) or >= 3",
            self.num_shares,
        )
        _require(
            self.reconstruction_threshold == 0 or self.reconstruction_threshold >= 2,
            "secagg.reconstruction-threshold",
            "must be 0 (auto) or >= 2",
            self.reconstruction_threshold,
        )
        if self.num_shares and self.reconstruction_threshold:
            _require(
                self.reconstruction_threshold < self.num_shares,
                "secagg.reconstruction-threshold",
                f"must be < secagg.num-shares = {self.num_shares} (no dropout could be "
                "tolerated, and Flower refuses it)",
                self.reconstruction_threshold,
            )
        _require(
            self.quantization_range == 0 or 2**16 <= self.quantization_range <= 2**30,
            "secagg.quantization-range",
            "must be 0 (auto) or in [2^16, 2^30]: fewer levels lose precision, more overflow "
            "Flower's int32 rounding",
            self.quantization_range,
        )
        for key, value in (
            ("secagg.clipping-range", self.clipping_range),
            ("secagg.max-weight", self.max_weight),
            ("secagg.timeout", self.timeout),
        ):
            _require(math.isfinite(value) and value >= 0, key, "must be 0 (auto) or > 0", value)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, grouped by concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FederationConfig = field(default_factory=FederationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = setting(42, "seed", "Seed for data splits, sampling and initialisation.")

    def __post_init__(self) -> None:
        _check_privacy_combinations(self)
        _check_secagg_combinations(self)
        _check_resume_combinations(self)
        _check_aggregation_combinations(self)
        _check_personal_combinations(self)
        if self.fed.aggregation == "secagg+":
            # Last: a combination refused above is the more specific error.
            check_secagg_max_weight(self)


SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig),
    ("lora", LoraSettings),
    ("data", DataConfig),
    ("train", TrainConfig),
    ("fed", FederationConfig),
    ("output", OutputConfig),
    ("privacy", PrivacyConfig),
    ("secagg", SecAggConfig),
    ("personal", PersonalConfig),
    ("eval", EvalConfig),
)


def _check_privacy_combinations(cfg: RunConfig) -> None:
    """Refuse settings that would silently void a DP guarantee, naming the key to change."""
    privacy = cfg.privacy
    if privacy.enabled:
        # The local-only baseline trains without DP and sends that adapter to the server.
        _require(
            not cfg.output.local_only_baseline,
            "output.local-only-baseline",
            "must be false when privacy is on: the local-only adapter is sent to the server "
            "without clipping or noise",
            cfg.output.local_only_baseline,
        )
    if privacy.client_level and privacy.mode != "client-fixed":
        # Server-side clipping needs each update; under SecAgg+ the server sees only the sum.
        # Client-fixed works there: clients clip, the server noises the sum.
        _require(
            cfg.fed.aggregation == "fedavg",
            "fed.aggregation",
            f"privacy.mode = {privacy.mode!r} needs fed.aggregation = 'fedavg' (under "
            "secagg+ use privacy.mode = 'client-fixed')",
            cfg.fed.aggregation,
        )
    if privacy.mode == "client-fixed":
        # float16 rounding of the whole adapter (not just the update) can push a clipped
        # update above the clip norm, and the server refuses such replies. The compressed
        # formats send the update itself, fitted to the clip norm after decoding.
        _require(
            cfg.fed.wire_dtype != "float16",
            "fed.wire-dtype",
            "must not be float16 with privacy.mode = 'client-fixed' (float32, or bfloat16, "
            "int8, nf4, which send the clipped update itself)",
            cfg.fed.wire_dtype,
        )
    if privacy.dpsgd:
        # One optimizer step per Poisson-sampled batch is what the Opacus accountant counts.
        _require(
            cfg.train.grad_accum == 1,
            "train.grad-accum",
            "must be 1 with privacy.dpsgd (each step is one Poisson-sampled batch)",
            cfg.train.grad_accum,
        )
        _require(
            not cfg.model.gradient_checkpointing,
            "model.gradient-checkpointing",
            "must be false with privacy.dpsgd (recomputed forwards confuse Opacus' hooks)",
            cfg.model.gradient_checkpointing,
        )


def check_secagg_max_weight(cfg: RunConfig) -> None:
    """Refuse SecAgg+ weighting by data held without a stated max weight ``W``.

    SecAgg+ sends a site's weight as ``round(min(n_k, W) / W x Q)`` and scales its values by
    that ratio before they are quantized, so ``W`` must bound the data a site holds and be
    close to it: a derived bound loose enough for any site (2^24 examples) leaves most of
    the quantization levels unused (docs/security.md). Client-level DP weighs every site 1.

    Raises
    ------
    ConfigError
        ``fed.weighting`` is examples or tokens and neither ``fed.max-weight`` nor
        ``secagg.max-weight`` is set; the message names both ways out.
    """
    fed = cfg.fed
    if cfg.privacy.client_level or fed.weighting not in ("examples", "tokens"):
        return
    if cfg.secagg.max_weight > 0 or fed.max_weight > 0:
        return
    held = "training examples" if fed.weighting == "examples" else "response tokens"
    raise ConfigError(
        f"run-config 'fed.max-weight' = {fed.max_weight!r}: fed.aggregation = 'secagg+' with "
        f"fed.weighting = {fed.weighting!r} weighs each site by the {held} it holds, sent as "
        "a fraction of a max weight W that the server cannot derive without losing the "
        f"precision of the secure sum. Set 'fed.max-weight' to the largest number of {held} "
        "any site holds (or 'secagg.max-weight', which wins under SecAgg+), or choose "
        "'fed.weighting' = 'seen' (examples trained on this round, bounded exactly by the "
        "settings) or 'uniform'"
    )


def _check_secagg_combinations(cfg: RunConfig) -> None:
    """Refuse settings that would send an individual update around SecAgg+'s masking."""
    if cfg.fed.aggregation != "secagg+":
        return
    _require(
        not cfg.output.local_only_baseline,
        "output.local-only-baseline",
        "must be false with fed.aggregation = 'secagg+': the local-only adapter would reach "
        "the server unmasked",
        cfg.output.local_only_baseline,
    )
    _require(
        cfg.fed.wire_dtype not in COMPRESSED_WIRE_DTYPES,
        "fed.wire-dtype",
        "must be float32 or float16 with fed.aggregation = 'secagg+': SecAgg+ sends its own "
        "fixed-point encoding of the update (its masks need integers modulo 2^32), so "
        "bfloat16, int8 or nf4 codes would be decoded before masking and save nothing",
        cfg.fed.wire_dtype,
    )


def _check_aggregation_combinations(cfg: RunConfig) -> None:
    """Refuse aggregation rules that need per-site updates where the server has none."""
    fed, lora = cfg.fed, cfg.lora
    per_site = cfg.fed.aggregation == "fedavg" and not cfg.privacy.client_level
    if fed.robust != "none":
        _require(
            per_site,
            "fed.robust",
            "needs each site's update on the server: not with fed.aggregation = 'secagg+' "
            "(the server sees the sum) nor with client-level DP (clipping and the fixed "
            "denominator are its bound)",
            fed.robust,
        )
        _require(
            lora.aggregation != "exact",
            "fed.robust",
            "must be 'none' with lora.aggregation = 'exact' (per-value statistics of "
            "factors B_k, A_k say nothing about their products)",
            fed.robust,
        )
    if lora.aggregation != "fedavg":
        # DP-FedAvg clips and noises whatever the sites send: B alone under ffa works.
        _require(
            cfg.fed.aggregation == "fedavg"
            and (lora.aggregation == "ffa" or not cfg.privacy.client_level),
            "lora.aggregation",
            "must be 'fedavg' with fed.aggregation = 'secagg+', and 'fedavg' or 'ffa' with "
            "client-level DP (exact re-factoring is not wired there)",
            lora.aggregation,
        )


def _check_personal_combinations(cfg: RunConfig) -> None:
    """Refuse personalization where the shared part would not train or not average."""
    if cfg.fed.personalization == "none":
        return
    _require(
        cfg.fed.wire_dtype not in COMPRESSED_WIRE_DTYPES,
        "fed.wire-dtype",
        "must be float32 or float16 with fed.personalization (the end-of-run comparison and "
        "local-b's A-only messages are not wired into compressed updates yet)",
        cfg.fed.wire_dtype,
    )
    if cfg.fed.personalization != "local-b":
        return
    # FedSA-LoRA federates A: ffa freezes A (nothing shared would ever train), and exact
    # re-factors products B A, which needs every site's B on the server.
    _require(
        cfg.lora.aggregation == "fedavg",
        "lora.aggregation",
        "must be 'fedavg' with fed.personalization = 'local-b' (ffa freezes A, the only "
        "part local-b federates; exact needs every site's B, which local-b never sends)",
        cfg.lora.aggregation,
    )


def _check_resume_combinations(cfg: RunConfig) -> None:
    """Refuse to resume what the server's checkpoint cannot restore (it lives on clients)."""
    if not cfg.output.resume:
        return
    # Each site keeps its DP-SGD accountant in its own state store (flower_llm.site_state),
    # which outlives the run; its local-only adapter still lives in Flower's per-run node
    # state, which a new run starts empty.
    _require(
        not cfg.output.local_only_baseline,
        "output.local-only-baseline",
        "must be false with output.resume = true: each site's local-only adapter lives "
        "in the run's node state and would restart from the global one",
        cfg.output.local_only_baseline,
    )


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------


def _coerce(key: str, value: Scalar, expected: type) -> Scalar:
    """Check a run-config scalar against the field's type; ints widen to floats."""
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is str and isinstance(value, str):
        return value
    raise ConfigError(
        f"run-config '{key}' = {value!r}: expected {expected.__name__}, got {type(value).__name__}"
    )


def _fields_by_key(section: type) -> dict[str, tuple[str, type]]:
    hints = get_type_hints(section)
    return {
        f.metadata["key"]: (f.name, hints[f.name])
        for f in dataclasses.fields(section)
        if "key" in f.metadata
    }


def known_keys() -> dict[str, dataclasses.Field[Any]]:
    """Every run-config key the apps understand, with its dataclass field."""
    keys: dict[str, dataclasses.Field[Any]] = {}
    for _, section in SECTIONS:
        for f in dataclasses.fields(section):
            keys[f.metadata["key"]] = f
    for f in dataclasses.fields(RunConfig):
        if "key" in f.metadata:
            keys[f.metadata["key"]] = f
    return keys


def parse_run_config(run_config: Mapping[str, Scalar]) -> RunConfig:
    """Build a :class:`RunConfig` from Flower's flat run-config.

    Missing keys take their defaults, so an empty mapping (what
    ``flwr.simulation.run_simulation`` passes) gives the embedded default run.

    Raises
    ------
    ConfigError
        A key is unknown (with the closest known key suggested) or a value has the
        wrong type or is out of range (the message names the key).
    """
    known = known_keys()
    for key in run_config:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown run-config key '{key}'{hint}")

    sections: dict[str, Any] = {}  # section name -> dataclass instance
    for section_name, section in SECTIONS:
        kwargs = {
            name: _coerce(key, run_config[key], expected)
            for key, (name, expected) in _fields_by_key(section).items()
            if key in run_config
        }
        sections[section_name] = section(**kwargs)
    top: dict[str, Any] = {
        name: _coerce(key, run_config[key], expected)
        for key, (name, expected) in _fields_by_key(RunConfig).items()
        if key in run_config
    }
    return RunConfig(**sections, **top)


def config_reference_markdown(app_defaults: Mapping[str, Scalar] | None = None) -> str:
    """A markdown table of every run-config key, its default and its meaning.

    ``app_defaults`` (:func:`app_config`) are the values `flwr run` starts from; without
    them the dataclass defaults are shown.
    """
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, f in known_keys().items():
        default = f.default if f.default is not dataclasses.MISSING else ""
        if app_defaults is not None and key in app_defaults:
            default = app_defaults[key]
        shown = repr(default).replace("\n", "\\n") if isinstance(default, str) else default
        if isinstance(default, bool):
            shown = str(default).lower()
        help_text = f.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{key}` | `{shown}` | {help_text} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Checks on the user's side, before `flwr run` submits anything
# --------------------------------------------------------------------------------------


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    flat: dict[str, Scalar] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def app_config(pyproject: str | Path) -> dict[str, Scalar]:
    """The flat ``[tool.flwr.app.config]`` of an app's pyproject.toml: what `flwr run` uses."""
    import tomllib

    file = Path(pyproject)
    if file.is_dir():
        file = file / "pyproject.toml"
    try:
        document = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read the app config in {file}: {err}") from None
    table = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if not isinstance(table, Mapping):
        raise ConfigError(f"{file} has no [tool.flwr.app.config] table")
    return _flatten(table)


def parse_overrides(args: list[str]) -> dict[str, Scalar]:
    """``--run-config`` strings (``'a=1 b="x"'``, or one .toml file) as a flat mapping.

    The syntax is the one `flwr run --run-config` accepts (Flower's own parser).
    """
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args(args))
    except Exception as err:  # click's exception for bad TOML, OSError for a file
        message = getattr(err, "message", None) or str(err)
        raise ConfigError(f"--run-config {' '.join(args)!r}: {message}") from None


def check_run_config(
    overrides: Mapping[str, Scalar], app_defaults: Mapping[str, Scalar]
) -> RunConfig:
    """Validate ``--run-config`` overrides against the app config, as the apps will.

    Catches what Flower only reports as "Invalid run configuration" (a key the app does
    not declare, a value of another type than the declared one) with the key named and
    the closest key suggested, then parses the merged config exactly as the apps do.

    Raises
    ------
    ConfigError
        Naming the key and what to change.
    """
    for key, value in overrides.items():
        if key not in app_defaults:
            close = difflib.get_close_matches(key, list(app_defaults), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown run-config key '{key}'{hint}")
        declared = app_defaults[key]
        if type(value) is not type(declared) and not (
            isinstance(declared, float) and type(value) is int
        ):
            raise ConfigError(
                f"run-config '{key}' = {value!r}: expected {type(declared).__name__} like the "
                f"app default {declared!r}, got {type(value).__name__}"
                + (' (quote strings: key="value")' if isinstance(declared, str) else "")
            )
    return parse_run_config({**app_defaults, **overrides})


def check_federation_size(fed: FederationConfig, num_nodes: int, where: str) -> None:
    """Refuse a federation too small for ``fed.min-*``, naming both numbers.

    ``where`` says where ``num_nodes`` comes from (``"num-supernodes"``, say) so the
    message tells the user which of the two settings to change.
    """
    for key, needed in (
        ("fed.min-available-clients", fed.min_available_clients),
        ("fed.min-train-clients", fed.min_train_clients),
    ):
        if num_nodes < needed:
            raise ConfigError(
                f"the federation has {num_nodes} node(s) ({where}) but run-config '{key}' = "
                f"{needed}: the run would wait forever; use {needed} or more nodes, or lower "
                f"{key} to {num_nodes}"
            )


def round_settings(instruction: Mapping[str, Any], cfg: RunConfig) -> tuple[int, float]:
    """``(server_round, learning_rate)`` of a train instruction's config record.

    This project's ServerApp sends both (``server-round``, ``learning-rate``). A stock
    Flower strategy sends ``server-round`` only, or nothing: the round defaults to 1 and
    the learning rate follows the run-config's schedule (``train.learning-rate``,
    ``train.lr-schedule``, ``train.lr-min`` over ``fed.num-rounds``).
    """
    server_round = int(instruction.get("server-round", 1))
    rate = instruction.get("learning-rate")
    if rate is None:
        rate = cfg.train.learning_rate_at(
            min(max(server_round, 1), cfg.fed.num_rounds), cfg.fed.num_rounds
        )
    return server_round, float(rate)
