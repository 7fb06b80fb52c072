"""Client-level DP-FedAvg: a wrapper that adds differential privacy to ``WeightedFedAvg``.

User-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", Alg. 1), with what its accounting assumes made true:

- **Poisson client sampling.** Each connected client takes part in a round independently
  with probability ``q = fed.fraction-train``; the RDP accountant amplifies by exactly this
  ``q``. (Flower's own sampling draws a fixed number without replacement, a different
  mechanism.)
- **A fixed denominator.** The noised average is ``(sum_i clip(u_i)) / m + N(0, (sigma C /
  m)^2)`` with ``m = round(q N)`` fixed at the start, ``N`` the clients connected then, and
  ``u_i = w_i - w`` the client adapter minus the global one. Dividing by the realised
  number of replies, or weighting by examples, would make one client's influence depend on
  the others' and void the sensitivity bound ``C / m``: under DP every client weighs the
  same.
- **A release every round.** ``fed.min-train-clients`` does not apply: skipping a round
  because few clients replied would reveal whether a given client took part, which the
  Gaussian noise does not cover. With few clients the released update is mostly noise.

Modes (``privacy.mode``):

- ``server-fixed``: the (trusted) server clips every valid update to ``C``.
- ``server-adaptive``: as server-fixed, then ``C`` follows the ``target-quantile`` of update
  norms by the geometric rule with a noised unclipped count (Andrew et al. 2021,
  "Differentially Private Learning with Adaptive Clipping", Alg. 1). The count's noise is
  paid for by raising the update noise so that the pair is one Gaussian mechanism with the
  configured multiplier (their Sec. 3, as Flower's ``compute_adaptive_noise_params``).
- ``client-fixed``: clients clip (``clip-norm`` in the instruction config); the server adds
  noise only, after checking every reply's update norm: a larger one means the client does
  not clip, and its reply is refused.

The wrapper holds the strategy and delegates validation, evaluation and metrics to it
(Flower's DP wrappers do the same); the maths is :mod:`flower_llm.privacy`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flower_llm import wire
from flower_llm.adapters import AdapterState
from flower_llm.config import DP_MODES, RunConfig
from flower_llm.privacy import (
    RdpAccountant,
    adaptive_clip_norm,
    adaptive_update_noise_multiplier,
    add_gaussian_noise,
    clip_update,
    dp_fedavg_noise_stddev,
    global_l2_norm,
    noisy_unclipped_fraction,
    would_exceed,
)
from strategies.fedavg import RoundReport, ValidReply, WeightedFedAvg

log = logging.getLogger(__name__)

#: Relative slack on ``C`` for updates clipped by clients: float32 rounding of
#: ``global + clipped update`` moves the update the server sees by a few ulps of the weights.
CLIENT_CLIP_TOLERANCE = 1e-4

_STATE_FORMAT = "flower-llm/dp-fedavg"
_STATE_VERSION = 1


class PrivacyError(RuntimeError):
    """A DP guard refused to go on: the run would not have the guarantee it reports."""


@dataclass(frozen=True)
class PrivacyRound:
    """What DP did in one round, for metrics.jsonl (nothing here depends on one client)."""

    epsilon: float
    delta: float
    clip_norm: float
    """The clip norm this round used (server-adaptive: before its update)."""
    noise_stddev: float
    """Standard deviation of the noise added to each coordinate of the average update."""
    expected_clients: int
    """``m``, the fixed denominator."""
    noisy_unclipped_fraction: float | None = None
    """server-adaptive only: the noised fraction that drove the clip-norm update."""

    def as_row(self) -> dict[str, Any]:
        """Keys as metrics.jsonl writes them."""
        row: dict[str, Any] = {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "dp-clip-norm": self.clip_norm,
            "dp-noise-stddev": self.noise_stddev,
            "dp-expected-clients": self.expected_clients,
        }
        if self.noisy_unclipped_fraction is not None:
            row["dp-noisy-unclipped-fraction"] = self.noisy_unclipped_fraction
        return row


class DifferentialPrivacyFedAvg(Strategy):
    """DP-FedAvg around a :class:`WeightedFedAvg`, with an RDP accountant across rounds.

    Parameters
    ----------
    strategy : WeightedFedAvg
        Validates replies, samples evaluation, aggregates metrics; its example weighting is
        NOT used for the model under DP (uniform weights, fixed denominator).
    mode : str
        ``server-fixed``, ``server-adaptive`` or ``client-fixed``.
    noise_multiplier : float
        ``sigma``: noise std of the summed update relative to ``C``, and what the accountant
        composes (in server-adaptive the update gets a bit more, see module docstring).
    clip_norm : float
        ``C`` (the initial value in server-adaptive).
    sampling_rate : float
        ``q``, each client's probability of taking part in a round.
    delta : float
        delta of the reported (epsilon, delta).
    target_epsilon : float
        Budget; 0 disables the stop. A round that would take epsilon above it never starts.
    min_sampled_clients : int
        Smallest acceptable ``q N``; fewer refuses to start.
    target_quantile, clip_learning_rate : float
        server-adaptive: ``gamma`` and ``eta_C`` of the geometric update.
    clipped_count_stddev : float, optional
        server-adaptive: ``sigma_b``; None means ``m / 20`` (Andrew et al.).
    seed : int, optional
        Seeds sampling and noise: for tests only. None draws OS entropy; a seed anyone can
        read (the run-config's) would let them subtract the noise.
    """

    def __init__(
        self,
        strategy: WeightedFedAvg,
        *,
        mode: str,
        noise_multiplier: float,
        clip_norm: float,
        sampling_rate: float,
        delta: float,
        target_epsilon: float = 0.0,
        min_sampled_clients: int = 1,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in DP_MODES or mode == "off":
            raise ValueError(f"mode must be one of {DP_MODES[1:]}, got {mode!r}")
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
        if target_epsilon < 0:
            raise ValueError(f"target_epsilon must be >= 0, got {target_epsilon!r}")
        self.strategy = strategy
        self.mode = mode
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.sampling_rate = float(sampling_rate)
        self.target_epsilon = float(target_epsilon)
        self.min_sampled_clients = int(min_sampled_clients)
        self.target_quantile = float(target_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self.clipped_count_stddev = clipped_count_stddev
        self.rng = np.random.default_rng(seed)
        # One round is the sampled Gaussian mechanism with (sigma, q), whatever the mode.
        self.accountant = RdpAccountant(self.noise_multiplier, self.sampling_rate, delta)
        self.population: int | None = None
        self.expected_clients: int | None = None
        self.update_noise_multiplier = self.noise_multiplier
        self.last_round: PrivacyRound | None = None
        self.warnings: list[str] = []
        if self.noise_multiplier == 0:
            self._warn(
                "privacy.noise-multiplier is 0: updates are clipped but NOT noised, so this "
                "run has NO differential privacy (epsilon is infinite)"
            )
        if self.target_epsilon > 0 and self.budget_exhausted():
            raise PrivacyError(
                f"privacy.target-epsilon = {self.target_epsilon} is below the epsilon of a "
                f"single round ({self.accountant.projected_epsilon(1):.4g} at sigma "
                f"{self.noise_multiplier}, q {self.sampling_rate}); raise the noise multiplier"
            )

    @classmethod
    def from_config(
        cls, strategy: WeightedFedAvg, cfg: RunConfig, seed: int | None = None
    ) -> DifferentialPrivacyFedAvg:
        """The wrapper the run-config's ``privacy.*`` and ``fed.fraction-train`` ask for."""
        p = cfg.privacy
        return cls(
            strategy,
            mode=p.mode,
            noise_multiplier=p.noise_multiplier,
            clip_norm=p.clip_norm,
            sampling_rate=cfg.fed.fraction_train,
            delta=p.delta,
            target_epsilon=p.target_epsilon,
            min_sampled_clients=p.min_sampled_clients,
            target_quantile=p.target_quantile,
            clip_learning_rate=p.clip_learning_rate,
            clipped_count_stddev=p.clipped_count_stddev or None,
            seed=seed,
        )

    def _warn(self, message: str) -> None:
        log.warning("DP WARNING: %s", message)
        self.warnings.append(message)

    # ----------------------------------------------------------------------------------
    # The round loop's interface
    # ----------------------------------------------------------------------------------

    @property
    def report(self) -> RoundReport:
        """The wrapped strategy's report of the last round."""
        return self.strategy.report

    @property
    def last_valid(self) -> list[ValidReply]:
        """The wrapped strategy's valid replies of the last round."""
        return self.strategy.last_valid

    def summary(self) -> None:
        """Log the DP settings, then the wrapped strategy's."""
        log.info(
            "DP-FedAvg (%s): noise multiplier %.4g (update %.4g), clip norm %.4g, q %.4g, "
            "delta %.3g, target epsilon %s",
            self.mode,
            self.noise_multiplier,
            self.update_noise_multiplier,
            self.clip_norm,
            self.sampling_rate,
            self.accountant.delta,
            self.target_epsilon or "none",
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the guards, then Poisson-sample clients and send them the adapter."""
        if self.budget_exhausted():
            raise PrivacyError(
                f"round {server_round} would take epsilon from {self.epsilon():.4g} to "
                f"{self.accountant.projected_epsilon(1):.4g}, above privacy.target-epsilon = "
                f"{self.target_epsilon}"
            )
        # Wait for the population as WeightedFedAvg would, then sample on our own.
        _, connected = sample_nodes(grid, self.strategy.min_available_nodes, 0)
        if self.population is None:
            self._start(len(connected))
        else:
            if len(connected) != self.population:
                log.info(
                    "DP: %d clients connected, %d at the start; the denominator stays %d",
                    len(connected),
                    self.population,
                    self.expected_clients,
                )
        sampled = [node for node in sorted(connected) if self.rng.random() < self.sampling_rate]
        log.info(
            "DP round %d: Poisson-sampled %d of %d", server_round, len(sampled), len(connected)
        )

        config = ConfigRecord(dict(config))
        config[wire.SERVER_ROUND] = server_round
        if self.mode == "client-fixed":
            config[wire.CLIP_NORM] = self.clip_norm
        self.strategy.start_round(server_round, arrays)
        self.strategy.report = RoundReport(
            sampled=sampled, bytes_down=wire.num_bytes(arrays) * len(sampled)
        )
        content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
        return [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            for node in sampled
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (or check), sum, divide by ``m``, add noise; step the accountant."""
        assert self.expected_clients is not None, "configure_train starts the accounting"
        assert self.strategy.reference is not None, "configure_train sets the reference"
        # What the sites train and send: the whole adapter, or B alone under ffa (the
        # frozen A is public, so clipping and noise cover all that a site contributes).
        reference = self.strategy.expected
        valid = self.strategy.valid_replies(replies)
        updates = [_difference(r.state, reference) for r in valid]
        if self.mode == "client-fixed":
            valid, updates = self._refuse_unclipped(valid, updates)

        # Clip: server modes always; client-fixed projects the tolerance band back onto C.
        m, clip_norm = self.expected_clients, self.clip_norm
        total = {k: np.zeros(v.shape, np.float64) for k, v in reference.items()}
        unclipped = 0
        for update in updates:
            clipped, _, was_clipped = clip_update(update, clip_norm)
            unclipped += int(not was_clipped)
            for key, value in clipped.items():
                total[key] += value

        # Noise the average with the fixed denominator m.
        stddev = dp_fedavg_noise_stddev(self.update_noise_multiplier, clip_norm, m)
        noised = add_gaussian_noise({k: v / m for k, v in total.items()}, stddev, self.rng)
        new_state = {
            **self.strategy.reference,
            **{
                key: (reference[key].astype(np.float64) + noised[key]).astype(np.float32)
                for key in reference
            },
        }

        fraction = None
        if self.mode == "server-adaptive":
            fraction = self._adapt_clip_norm(unclipped, len(updates))
        self.accountant.step()
        self.last_round = PrivacyRound(
            epsilon=self.epsilon(),
            delta=self.accountant.delta,
            clip_norm=clip_norm,
            noise_stddev=stddev,
            expected_clients=m,
            noisy_unclipped_fraction=fraction,
        )
        self.strategy.report.updated = True
        metrics = self.strategy.aggregate_train_metrics(valid) if valid else MetricRecord()
        log.info(
            "DP round %d: %d updates, noise std %.3g on the average, epsilon %.4g (delta %.3g)",
            server_round,
            len(updates),
            stddev,
            self.last_round.epsilon,
            self.accountant.delta,
        )
        return wire.to_array_record(new_state, self.strategy.wire_dtype), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated: evaluation sees only the noised global adapter."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ----------------------------------------------------------------------------------
    # Guards and the phases of a round
    # ----------------------------------------------------------------------------------

    def _start(self, population: int) -> None:
        """Fix ``N`` and ``m = round(q N)`` and check the start-up guards."""
        expected = self.sampling_rate * population
        if expected < self.min_sampled_clients:
            raise PrivacyError(
                f"DP-FedAvg expects {expected:g} clients per round (fed.fraction-train "
                f"{self.sampling_rate} x {population} connected), fewer than "
                f"privacy.min-sampled-clients = {self.min_sampled_clients}: the noise would "
                f"swamp the update. Connect more clients or raise fed.fraction-train."
            )
        self.population = population
        # Any data-independent denominator gives a valid mechanism (noise and sensitivity
        # both scale with 1/m); round(q N) keeps the estimator close to unbiased.
        self.expected_clients = max(1, round(expected))
        if self.mode == "server-adaptive":
            if self.clipped_count_stddev is None:
                self.clipped_count_stddev = self.expected_clients / 20.0
            try:
                self.update_noise_multiplier = adaptive_update_noise_multiplier(
                    self.noise_multiplier, self.clipped_count_stddev
                )
            except ValueError as err:
                raise PrivacyError(
                    f"privacy.clipped-count-stddev ({self.clipped_count_stddev:g}; 0 means "
                    f"expected clients / 20) must exceed privacy.noise-multiplier / 2 "
                    f"({self.noise_multiplier / 2:g}): {err}"
                ) from err
        log.info(
            "DP-FedAvg: population N = %d, q = %.4g, fixed denominator m = %d",
            population,
            self.sampling_rate,
            self.expected_clients,
        )

    def _refuse_unclipped(
        self, valid: list[ValidReply], updates: list[AdapterState]
    ) -> tuple[list[ValidReply], list[AdapterState]]:
        """client-fixed: drop replies whose update exceeds ``C``; all of them is fatal."""
        limit = self.clip_norm * (1.0 + CLIENT_CLIP_TOLERANCE)
        kept_replies, kept_updates, refused = [], [], []
        for reply, update in zip(valid, updates, strict=True):
            norm = global_l2_norm(update)
            if norm <= limit:
                kept_replies.append(reply)
                kept_updates.append(update)
                continue
            reason = (
                f"update norm {norm:.6g} exceeds privacy.clip-norm {self.clip_norm:g}: "
                "client clipping is not active on this node (privacy.mode = 'client-fixed' "
                "needs a ClientApp that clips to the 'clip-norm' it is sent)"
            )
            log.error("Refusing reply of node %d: %s", reply.node_id, reason)
            self.strategy.report.dropped[reply.node_id] = reason
            refused.append(reply.node_id)
        self.strategy.report.accepted = [r.node_id for r in kept_replies]
        if refused and not kept_replies:
            raise PrivacyError(
                f"every reply exceeded privacy.clip-norm = {self.clip_norm:g} (nodes "
                f"{refused}): client clipping is not active, so privacy.mode = "
                "'client-fixed' would add noise to unbounded updates. Stopping."
            )
        return kept_replies, kept_updates

    def _adapt_clip_norm(self, unclipped: int, counted: int) -> float:
        """Geometric clip-norm step from the noised unclipped count over ``m``."""
        assert self.expected_clients is not None and self.clipped_count_stddev is not None
        m = self.expected_clients
        # noisy_unclipped_fraction divides by the clients counted; rescaling by
        # counted / m gives Andrew et al.'s (count + noise) / m with the FIXED m, so the
        # clip norm does not depend on how many clients happened to be sampled.
        counted = max(counted, 1)
        fraction = (
            noisy_unclipped_fraction(unclipped, counted, self.clipped_count_stddev, self.rng)
            * counted
            / m
        )
        self.clip_norm = adaptive_clip_norm(
            self.clip_norm, fraction, self.target_quantile, self.clip_learning_rate
        )
        return fraction

    # ----------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------

    def epsilon(self) -> float:
        """epsilon spent so far at the configured delta."""
        return self.accountant.epsilon()

    def budget_exhausted(self) -> bool:
        """Whether one more round would take epsilon above ``target_epsilon`` (if set)."""
        return self.target_epsilon > 0 and would_exceed(self.accountant, self.target_epsilon)

    def privacy_summary(self) -> dict[str, Any]:
        """What summary.json records about DP."""
        return {
            "mode": self.mode,
            "epsilon": self.epsilon(),
            "delta": self.accountant.delta,
            "rounds-accounted": self.accountant.rounds,
            "noise-multiplier": self.noise_multiplier,
            "update-noise-multiplier": self.update_noise_multiplier,
            "sampling-rate": self.sampling_rate,
            "population": self.population,
            "expected-clients": self.expected_clients,
            "clip-norm": self.clip_norm,
            "target-epsilon": self.target_epsilon,
            "budget-exhausted": self.budget_exhausted(),
            "warnings": list(self.warnings),
        }

    # ----------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: accountant, clip norm, population and the noise RNG.

        The RNG state reproduces every future noise draw: keep checkpoints as secret as
        the clients' individual updates.
        """
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "mode": self.mode,
            "accountant": self.accountant.state_dict(),
            "clip-norm": self.clip_norm,
            "clipped-count-stddev": self.clipped_count_stddev,
            "population": self.population,
            "expected-clients": self.expected_clients,
            "update-noise-multiplier": self.update_noise_multiplier,
            "rng": _jsonable_rng_state(self.rng.bit_generator.state),
            "warnings": list(self.warnings),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; refuses a state from different DP settings."""
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a DP-FedAvg state of version {_STATE_VERSION}: {state.get('format')!r}"
            )
        if state["mode"] != self.mode:
            raise ValueError(
                f"checkpoint was taken with privacy.mode = {state['mode']!r}, not {self.mode!r}"
            )
        accountant = RdpAccountant.from_state_dict(state["accountant"])
        for key, saved, now in (
            ("privacy.noise-multiplier", accountant.noise_multiplier, self.noise_multiplier),
            ("fed.fraction-train", accountant.sampling_rate, self.sampling_rate),
            ("privacy.delta", accountant.delta, self.accountant.delta),
        ):
            if not math.isclose(saved, now, rel_tol=1e-12):
                raise ValueError(
                    f"{key} is {now} but the checkpoint's accountant used {saved}: resuming "
                    "would compose rounds the accountant does not describe"
                )
        self.accountant = accountant
        self.clip_norm = float(state["clip-norm"])
        self.clipped_count_stddev = state["clipped-count-stddev"]
        self.population = state["population"]
        self.expected_clients = state["expected-clients"]
        self.update_noise_multiplier = float(state["update-noise-multiplier"])
        self.rng.bit_generator.state = state["rng"]
        self.warnings = list(dict.fromkeys([*state.get("warnings", []), *self.warnings]))


def _difference(
    state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> AdapterState:
    """``state - reference`` per array, in float64 (clipping must not see rounding)."""
    return {k: state[k].astype(np.float64) - reference[k].astype(np.float64) for k in reference}


def _jsonable_rng_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """numpy's bit-generator state with its integers as plain ints (JSON-safe)."""
    return {
        k: (
            _jsonable_rng_state(v)
            if isinstance(v, Mapping)
            else int(v)
            if isinstance(v, np.integer)
            else v
        )
        for k, v in state.items()
    }


# --------------------------------------------------------------------------------------
# Run-level reporting (both DP-FedAvg and clients' DP-SGD)
# --------------------------------------------------------------------------------------


def dpsgd_warnings(cfg: RunConfig) -> list[str]:
    """Loud start-up warnings about sample-level DP-SGD settings that give no privacy."""
    warnings = []
    if cfg.privacy.dpsgd and cfg.privacy.dpsgd_noise_multiplier == 0:
        warnings.append(
            "privacy.dpsgd-noise-multiplier is 0: per-example gradients are clipped but NOT "
            "noised, so DP-SGD gives NO sample-level privacy (epsilon is infinite)"
        )
    for message in warnings:
        log.warning("DP WARNING: %s", message)
    return warnings


def privacy_summary(
    strategy: object, cfg: RunConfig, history: list[dict[str, Any]], warnings: list[str]
) -> dict[str, Any]:
    """The ``privacy`` section of summary.json: what was guaranteed, and every warning."""
    out: dict[str, Any] = {"warnings": list(warnings)}
    if isinstance(strategy, DifferentialPrivacyFedAvg):
        out["client-level"] = strategy.privacy_summary()
        out["warnings"] = [*strategy.warnings, *out["warnings"]]
    if cfg.privacy.dpsgd:
        # Each site reports its own cumulative epsilon; the weakest site is the guarantee.
        key = f"train/{wire.DPSGD_EPSILON}"
        reported = [row[key] for row in history if isinstance(row.get(key), int | float)]
        out["sample-level"] = {
            "epsilon-max-over-sites": max(reported) if reported else None,
            "delta": cfg.privacy.dpsgd_delta,
            "noise-multiplier": cfg.privacy.dpsgd_noise_multiplier,
            "max-grad-norm": cfg.privacy.dpsgd_max_grad_norm,
        }
    return out
