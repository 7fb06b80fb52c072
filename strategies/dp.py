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

The server half that every client-level DP run shares, whatever carries the updates
(Message-API replies here, a SecAgg+ sum in :mod:`strategies.secagg`), is
:class:`CentralDP`: the clip bound, the noise with the fixed denominator, the accountant,
the budget check and the state a checkpoint keeps. The wrapper holds the strategy and
delegates validation, evaluation and metrics to it (Flower's DP wrappers do the same); the
maths is :mod:`flower_llm.privacy`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_llm import wire
from flower_llm.config import DP_MODES, RunConfig
from flower_llm.metrics import (
    DELTA,
    DP_CLIP_NORM,
    DP_DELTA_TOTAL,
    DP_EXPECTED_CLIENTS,
    DP_NOISE_STDDEV,
    DP_NOISY_UNCLIPPED_FRACTION,
    EPSILON,
    prefixed,
)
from flower_llm.privacy import (
    DualAccountant,
    adaptive_clip_norm,
    adaptive_update_noise_multiplier,
    add_gaussian_noise,
    clip_update,
    dp_fedavg_noise_stddev,
    epsilons,
    global_l2_norm,
    noisy_unclipped_fraction,
    small_cohort_probability,
    would_exceed,
)
from flower_llm.streams import jsonable
from strategies.fedavg import RoundReport, ValidReply, WeightedFedAvg
from strategies.sampling import PoissonSampler, Sampler, wait_for_nodes

if TYPE_CHECKING:
    from flower_llm.adapters import AdapterState  # torch-free at run time

log = logging.getLogger(__name__)

#: Relative slack on ``C`` for updates clipped by clients: float32 rounding of
#: ``global + clipped update`` moves the update the server sees by a few ulps of the weights.
CLIENT_CLIP_TOLERANCE = 1e-4

_STATE_FORMAT = "flower-llm/central-dp"
_STATE_VERSION = 2

#: The client-level accountant: PLD and exact RDP kept in step, ``privacy.accountant`` the
#: headline (epsilon, budget stop). Built only by :func:`make_accountant` and
#: :func:`load_accountant`.
Accountant = DualAccountant


def make_accountant(
    kind: str, noise_multiplier: float, sampling_rate: float, delta: float
) -> Accountant:
    """The accountant of one round = the Poisson-subsampled Gaussian with ``(sigma, q)``."""
    return Accountant(kind, noise_multiplier, sampling_rate, delta)


def load_accountant(state: Mapping[str, Any], kind: str) -> Accountant:
    """An accountant continued from its ``state_dict()`` (or a pre-PLD RDP-only state)."""
    return Accountant.from_checkpoint(state, kind)


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
    epsilons: Mapping[str, float] = field(default_factory=dict)
    """Both accountants' epsilons (``pld-epsilon``, ``rdp-epsilon``) next to the headline."""
    delta_total: float | None = None
    """delta of the run's guarantee: ``delta`` plus what small cohorts add (SecAgg+)."""

    def as_row(self) -> dict[str, Any]:
        """Keys as metrics.jsonl writes them."""
        row: dict[str, Any] = {
            EPSILON: self.epsilon,
            DELTA: self.delta,
            DP_CLIP_NORM: self.clip_norm,
            DP_NOISE_STDDEV: self.noise_stddev,
            DP_EXPECTED_CLIENTS: self.expected_clients,
            DP_DELTA_TOTAL: self.delta if self.delta_total is None else self.delta_total,
        }
        if self.noisy_unclipped_fraction is not None:
            row[DP_NOISY_UNCLIPPED_FRACTION] = self.noisy_unclipped_fraction
        row.update({k: v for k, v in self.epsilons.items() if k != EPSILON})
        return row


class CentralDP:
    """The server half of client-level DP, shared by DP-FedAvg and SecAgg+ with DP.

    One round releases ``reference + sum_i clip(u_i) / m + N(0, (sigma_u S / m)^2)`` with
    ``S`` the L2 sensitivity of one client on the sum (``C``, plus SecAgg+'s rounding),
    ``m = round(q N)`` fixed when the first round starts, and ``sigma_u`` the update noise
    multiplier (``sigma``, or more under adaptive clipping). The accountant composes one
    Poisson-subsampled Gaussian with ``(sigma, q)`` per released round.

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``.
    clip_norm : float
        ``C`` (the initial value when the caller adapts it).
    sampling_rate : float
        ``q``; rounds must be drawn by :attr:`sampler`, which Poisson-samples at ``q``.
    delta : float
        delta of the reported (epsilon, delta).
    target_epsilon : float
        Budget; 0 disables the stop. A round that would take epsilon above it never starts.
    min_sampled_clients : int
        Smallest acceptable ``q N``; fewer refuses to start.
    planned_rounds : int
        Rounds the run plans (``fed.num-rounds``), for the small-cohort check.
    small_cohorts : str
        ``refuse`` or ``account``: what to do when a mode that releases only cohorts of a
        minimum size (:meth:`release_only_cohorts_of`) would add more than ``delta``.
    rng : numpy.random.Generator
        Draws the noise; from OS entropy unless a test seeds it (known noise protects
        nothing).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        sampling_rate: float,
        delta: float,
        target_epsilon: float = 0.0,
        min_sampled_clients: int = 1,
        rng: np.random.Generator | None = None,
        accountant: str = "pld",
        planned_rounds: int = 0,
        small_cohorts: str = "refuse",
    ) -> None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
        if target_epsilon < 0:
            raise ValueError(f"target_epsilon must be >= 0, got {target_epsilon!r}")
        if small_cohorts not in ("refuse", "account"):
            raise ValueError(f"small_cohorts must be refuse or account, got {small_cohorts!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.sampling_rate = float(sampling_rate)
        self.target_epsilon = float(target_epsilon)
        self.min_sampled_clients = int(min_sampled_clients)
        self.planned_rounds = int(planned_rounds)
        self.small_cohorts = small_cohorts
        self.min_release_cohort = 0
        """Cohorts below this many sites release noise alone (0: every cohort's sum)."""
        self.small_cohort_delta = 0.0
        """What released rounds' small-cohort chances have added to delta so far."""
        self._round_small_cohort = 0.0
        self._plan_checked = False
        self.rng = rng if rng is not None else np.random.default_rng()
        self.accountant = make_accountant(
            accountant, self.noise_multiplier, self.sampling_rate, delta
        )
        self.sampler = PoissonSampler(self.sampling_rate)
        """The sampling the accountant composes; draw every DP round with it."""
        self.rng_for_sampling = np.random.default_rng()
        """Draws the cohorts; the owner sets it to the run's train-sampling stream."""
        self.update_noise_multiplier = self.noise_multiplier
        self.population: int | None = None
        self.expected_clients: int | None = None
        self.last_round: PrivacyRound | None = None
        self.warnings: list[str] = []
        if self.noise_multiplier == 0:
            self.warn(
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
    def from_config(cls, cfg: RunConfig, rng: np.random.Generator | None = None) -> CentralDP:
        """The component ``privacy.*`` and ``fed.fraction-train`` (= ``q``) ask for."""
        p = cfg.privacy
        return cls(
            noise_multiplier=p.noise_multiplier,
            clip_norm=p.clip_norm,
            sampling_rate=cfg.fed.fraction_train,
            delta=p.delta,
            target_epsilon=p.target_epsilon,
            min_sampled_clients=p.min_sampled_clients,
            rng=rng,
            accountant=p.accountant,
            planned_rounds=cfg.fed.num_rounds,
            small_cohorts=p.small_cohorts,
        )

    def warn(self, message: str) -> None:
        """Log a DP warning and keep it for summary.json."""
        log.warning("DP WARNING: %s", message)
        if message not in self.warnings:
            self.warnings.append(message)

    # ----------------------------------------------------------------------------------
    # A round
    # ----------------------------------------------------------------------------------

    def check_sampler(self, sampler: Sampler) -> None:
        """Refuse a sampler whose draw is not the event the accountant composes."""
        if sampler.kind != "poisson" or getattr(sampler, "rate", None) != self.sampling_rate:
            raise PrivacyError(
                f"the round sampler ({sampler.kind}) is not Poisson sampling at q = "
                f"{self.sampling_rate}, the event the accountant composes"
            )

    def release_only_cohorts_of(self, min_cohort: int) -> None:
        """The caller releases noise alone for cohorts under ``min_cohort`` sites.

        SecAgg+ cannot sum fewer than 3 updates. Such a round departs from the accounted
        subsampled Gaussian; :func:`small_cohort_probability` bounds what that adds to
        delta, which :attr:`small_cohort_delta` accumulates and ``dp-delta-total`` reports.
        """
        self.min_release_cohort = int(min_cohort)

    @property
    def delta_total(self) -> float:
        """delta of the guarantee the run has: ``delta`` plus the small-cohort term."""
        return self.accountant.delta + self.small_cohort_delta

    def _check_small_cohorts(self, server_round: int, connected: int) -> None:
        """This round's small-cohort chance; refuse (or warn) once when the plan exceeds delta."""
        chance = small_cohort_probability(connected, self.sampling_rate, self.min_release_cohort)
        self._round_small_cohort = chance
        if self._plan_checked or chance == 0.0:
            return
        self._plan_checked = True
        remaining = max(self.planned_rounds - server_round + 1, 1)
        planned = self.small_cohort_delta + remaining * chance
        delta = self.accountant.delta
        if planned <= delta:
            return
        message = (
            f"a Poisson cohort of fewer than {self.min_release_cohort} sites releases noise "
            f"alone, which the accounted subsampled Gaussian does not cover: with N = "
            f"{connected} connected and q = {self.sampling_rate}, a site decides that with "
            f"chance {chance:.3g} a round, more than privacy.delta = {delta:g} over the run"
        )
        if self.small_cohorts == "refuse":
            raise PrivacyError(
                f"{message} (up to {planned:.3g} in {remaining} round(s)). Raise "
                "fed.fraction-train (q = 1 with 4 or more sites never has a small cohort), "
                'connect more sites, or set privacy.small-cohorts = "account" to run with '
                "the guarantee (epsilon, dp-delta-total)"
            )
        self.warn(f"{message}: the guarantee is (epsilon, dp-delta-total), not (epsilon, delta)")

    def start_round(self, server_round: int, connected: list[int]) -> list[int]:
        """Check the budget, fix ``N`` and ``m`` on the first call, Poisson-sample."""
        if self.budget_exhausted():
            raise PrivacyError(
                f"round {server_round} would take epsilon from {self.epsilon():.4g} to "
                f"{self.accountant.projected_epsilon(1):.4g}, above privacy.target-epsilon = "
                f"{self.target_epsilon}"
            )
        if self.population is None:
            self.fix_population(len(connected))
        elif len(connected) != self.population:
            log.info(
                "DP: %d clients connected, %d at the start; the denominator stays %d",
                len(connected),
                self.population,
                self.expected_clients,
            )
        self._check_small_cohorts(server_round, len(connected))
        return self.sampler.sample(connected, self.rng_for_sampling)

    def fix_population(self, population: int) -> None:
        """Fix ``N`` and ``m = round(q N)``; refuse too few expected clients."""
        expected = self.sampling_rate * population
        if expected < self.min_sampled_clients:
            raise PrivacyError(
                f"client-level DP expects {expected:g} clients per round (fed.fraction-train "
                f"{self.sampling_rate} x {population} connected), fewer than "
                f"privacy.min-sampled-clients = {self.min_sampled_clients}: the noise would "
                f"swamp the update. Connect more clients or raise fed.fraction-train."
            )
        self.population = population
        # Any data-independent denominator gives a valid mechanism (noise and sensitivity
        # both scale with 1/m); round(q N) keeps the estimator close to unbiased.
        self.expected_clients = max(1, round(expected))
        log.info(
            "Client-level DP: population N = %d, q = %.4g, fixed denominator m = %d",
            population,
            self.sampling_rate,
            self.expected_clients,
        )

    def release(
        self,
        reference: Mapping[str, np.ndarray],
        clipped_sum: Mapping[str, np.ndarray],
        *,
        sensitivity: float | None = None,
        noisy_unclipped_fraction: float | None = None,
        clip_norm: float | None = None,
    ) -> AdapterState:
        """``reference + clipped_sum / m + noise`` (float32); steps the accountant.

        ``sensitivity`` defaults to the clip norm; ``clip_norm`` is what the round used
        (for the metrics row; default the current one).
        """
        assert self.expected_clients is not None, "start_round fixes m first"
        m = self.expected_clients
        used_clip = self.clip_norm if clip_norm is None else clip_norm
        bound = used_clip if sensitivity is None else sensitivity
        stddev = dp_fedavg_noise_stddev(self.update_noise_multiplier, bound, m)
        mean = {k: np.asarray(clipped_sum[k], np.float64) / m for k in reference}
        noised = add_gaussian_noise(mean, stddev, self.rng)
        new_state = {
            key: (np.asarray(reference[key], np.float64) + noised[key]).astype(np.float32)
            for key in reference
        }
        self.accountant.step()
        self.small_cohort_delta += self._round_small_cohort
        self._round_small_cohort = 0.0
        self.last_round = PrivacyRound(
            epsilon=self.epsilon(),
            epsilons=epsilons(self.accountant),
            delta=self.accountant.delta,
            clip_norm=used_clip,
            noise_stddev=stddev,
            expected_clients=m,
            noisy_unclipped_fraction=noisy_unclipped_fraction,
            delta_total=self.delta_total,
        )
        return new_state

    # ----------------------------------------------------------------------------------
    # Accounting
    # ----------------------------------------------------------------------------------

    def epsilon(self) -> float:
        """epsilon spent so far at the configured delta."""
        return self.accountant.epsilon()

    def budget_exhausted(self) -> bool:
        """Whether one more round would take epsilon above ``target_epsilon`` (if set)."""
        return self.target_epsilon > 0 and would_exceed(self.accountant, self.target_epsilon)

    def summary(self) -> dict[str, Any]:
        """What summary.json records about client-level DP."""
        return {
            "accountant": self.accountant.kind,
            **epsilons(self.accountant),
            "delta": self.accountant.delta,
            "small-cohort-delta": self.small_cohort_delta,
            "delta-total": self.delta_total,
            "rounds-accounted": self.accountant.rounds,
            "noise-multiplier": self.noise_multiplier,
            "update-noise-multiplier": self.update_noise_multiplier,
            "sampling": self.sampler.kind,
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
        """JSON-serialisable state: accountant, clip norm, population, noise RNG, warnings.

        The RNG state reproduces every future noise draw: keep checkpoints as secret as
        the clients' individual updates.
        """
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "accountant": self.accountant.state_dict(),
            "clip-norm": self.clip_norm,
            "population": self.population,
            "expected-clients": self.expected_clients,
            "update-noise-multiplier": self.update_noise_multiplier,
            "small-cohort-delta": self.small_cohort_delta,
            "rng": jsonable(self.rng.bit_generator.state),
            "warnings": list(self.warnings),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; refuses a state from different DP settings."""
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a central-DP state of version {_STATE_VERSION}: {state.get('format')!r}"
            )
        accountant = load_accountant(state["accountant"], self.accountant.kind)
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
        self.population = state["population"]
        self.expected_clients = state["expected-clients"]
        self.update_noise_multiplier = float(state["update-noise-multiplier"])
        if "small-cohort-delta" in state:
            self.small_cohort_delta = float(state["small-cohort-delta"])
        elif self.population is not None:  # a checkpoint from before the term: N as fixed
            self.small_cohort_delta = accountant.rounds * small_cohort_probability(
                self.population, self.sampling_rate, self.min_release_cohort
            )
        self.rng.bit_generator.state = state["rng"]
        self.warnings = list(dict.fromkeys([*state.get("warnings", []), *self.warnings]))


class DifferentialPrivacyFedAvg(Strategy):
    """DP-FedAvg around a :class:`WeightedFedAvg`, its server half a :class:`CentralDP`.

    Parameters
    ----------
    strategy : WeightedFedAvg
        Validates replies, samples evaluation, aggregates metrics; its example weighting is
        NOT used for the model under DP (uniform weights, fixed denominator).
    central : CentralDP
        Clip bound, noise, accountant, budget; its sampler draws the train cohorts, from
        ``strategy.train_rng``.
    mode : str
        ``server-fixed``, ``server-adaptive`` or ``client-fixed``.
    target_quantile, clip_learning_rate : float
        server-adaptive: ``gamma`` and ``eta_C`` of the geometric update.
    clipped_count_stddev : float, optional
        server-adaptive: ``sigma_b``; None means ``m / 20`` (Andrew et al.).
    """

    def __init__(
        self,
        strategy: WeightedFedAvg,
        central: CentralDP,
        *,
        mode: str,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in DP_MODES or mode == "off":
            raise ValueError(f"mode must be one of {DP_MODES[1:]}, got {mode!r}")
        self.strategy = strategy
        self.central = central
        central.rng_for_sampling = strategy.train_rng
        self.mode = mode
        self.target_quantile = float(target_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self.clipped_count_stddev = clipped_count_stddev

    @classmethod
    def from_config(
        cls, strategy: WeightedFedAvg, cfg: RunConfig, noise_rng: np.random.Generator | None = None
    ) -> DifferentialPrivacyFedAvg:
        """The wrapper the run-config's ``privacy.*`` and ``fed.fraction-train`` ask for."""
        p = cfg.privacy
        return cls(
            strategy,
            CentralDP.from_config(cfg, noise_rng),
            mode=p.mode,
            target_quantile=p.target_quantile,
            clip_learning_rate=p.clip_learning_rate,
            clipped_count_stddev=p.clipped_count_stddev or None,
        )

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

    @property
    def warnings(self) -> list[str]:
        """DP warnings so far."""
        return self.central.warnings

    # Read-only views of the central component, in the wrapper's terms.
    @property
    def accountant(self) -> Accountant:
        """The central component's accountant."""
        return self.central.accountant

    @property
    def clip_norm(self) -> float:
        """``C`` of the next round."""
        return self.central.clip_norm

    @property
    def sampling_rate(self) -> float:
        """``q``."""
        return self.central.sampling_rate

    @property
    def expected_clients(self) -> int | None:
        """``m``, fixed when the first round starts."""
        return self.central.expected_clients

    @property
    def last_round(self) -> PrivacyRound | None:
        """What DP did in the last round."""
        return self.central.last_round

    def summary(self) -> None:
        """Log the DP settings, then the wrapped strategy's."""
        c = self.central
        log.info(
            "DP-FedAvg (%s): noise multiplier %.4g (update %.4g), clip norm %.4g, q %.4g "
            "(Poisson), delta %.3g, target epsilon %s",
            self.mode,
            c.noise_multiplier,
            c.update_noise_multiplier,
            c.clip_norm,
            c.sampling_rate,
            c.accountant.delta,
            c.target_epsilon or "none",
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the guards, then Poisson-sample clients and send them the adapter."""
        connected = wait_for_nodes(
            grid, self.strategy.min_available_nodes, self.strategy.wait_timeout
        )
        first = self.central.population is None
        sampled = self.central.start_round(server_round, connected)
        if first and self.mode == "server-adaptive":
            self._fix_adaptive_noise()
        log.info(
            "DP round %d: Poisson-sampled %d of %d", server_round, len(sampled), len(connected)
        )
        config = ConfigRecord(dict(config))
        config[wire.SERVER_ROUND] = server_round
        if self.mode == "client-fixed":
            config[wire.CLIP_NORM] = self.central.clip_norm
        self.strategy.start_round(server_round, arrays)
        self.strategy.report = self.strategy.new_report(sampled)
        messages = self.strategy.messages_for(sampled, arrays, config, MessageType.TRAIN)
        self.strategy.instructions = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (or check), sum, then the central release: ``/ m``, noise, account."""
        assert self.strategy.reference is not None, "configure_train sets the reference"
        # What the sites train and send: the whole adapter, or B alone under ffa (the
        # frozen A is public, so clipping and noise cover all that a site contributes).
        reference = self.strategy.expected
        valid = self.strategy.valid_replies(replies)
        updates = [_difference(r.state, reference) for r in valid]
        if self.mode == "client-fixed":
            valid, updates = self._refuse_unclipped(valid, updates)

        # Clip: server modes always; client-fixed projects the tolerance band back onto C.
        clip_norm = self.central.clip_norm
        total = {k: np.zeros(v.shape, np.float64) for k, v in reference.items()}
        unclipped = 0
        for update in updates:
            clipped, _, was_clipped = clip_update(update, clip_norm)
            unclipped += int(not was_clipped)
            for key, value in clipped.items():
                total[key] += value

        # Noise the released adapter with C of this round, then adapt C for the next; a
        # frozen A (ffa) stays as it was.
        new_state = {
            **self.strategy.reference,
            **self.central.release(reference, total, clip_norm=clip_norm),
        }
        if self.mode == "server-adaptive":
            fraction = self._noisy_fraction(unclipped, len(updates))
            self.central.clip_norm = adaptive_clip_norm(
                clip_norm, fraction, self.target_quantile, self.clip_learning_rate
            )
            assert self.central.last_round is not None
            self.central.last_round = replace(
                self.central.last_round, noisy_unclipped_fraction=fraction
            )
        self.strategy.report.updated = True
        metrics = self.strategy.aggregate_train_metrics(valid) if valid else MetricRecord()
        assert self.central.last_round is not None
        log.info(
            "DP round %d: %d updates, noise std %.3g on the average, epsilon %.4g (delta %.3g)",
            server_round,
            len(updates),
            self.central.last_round.noise_stddev,
            self.central.last_round.epsilon,
            self.central.accountant.delta,
        )
        # After the noise: compressing what goes down is post-processing.
        return self.strategy.publish(new_state), metrics

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
    # The phases of a round
    # ----------------------------------------------------------------------------------

    def _fix_adaptive_noise(self) -> None:
        """server-adaptive: split sigma between the update and the clipped count."""
        c = self.central
        assert c.expected_clients is not None
        if self.clipped_count_stddev is None:
            self.clipped_count_stddev = c.expected_clients / 20.0
        try:
            c.update_noise_multiplier = adaptive_update_noise_multiplier(
                c.noise_multiplier, self.clipped_count_stddev
            )
        except ValueError as err:
            raise PrivacyError(
                f"privacy.clipped-count-stddev ({self.clipped_count_stddev:g}; 0 means "
                f"expected clients / 20) must exceed privacy.noise-multiplier / 2 "
                f"({c.noise_multiplier / 2:g}): {err}"
            ) from err

    def _refuse_unclipped(
        self, valid: list[ValidReply], updates: list[AdapterState]
    ) -> tuple[list[ValidReply], list[AdapterState]]:
        """client-fixed: drop replies whose update exceeds ``C``; all of them is fatal."""
        clip_norm = self.central.clip_norm
        limit = clip_norm * (1.0 + CLIENT_CLIP_TOLERANCE)
        kept_replies, kept_updates, refused = [], [], []
        for reply, update in zip(valid, updates, strict=True):
            norm = global_l2_norm(update)
            if norm <= limit:
                kept_replies.append(reply)
                kept_updates.append(update)
                continue
            reason = (
                f"update norm {norm:.6g} exceeds privacy.clip-norm {clip_norm:g}: "
                "client clipping is not active on this node (privacy.mode = 'client-fixed' "
                "needs a ClientApp that clips to the 'clip-norm' it is sent)"
            )
            log.error("Refusing reply of node %d: %s", reply.node_id, reason)
            self.strategy.report.dropped[reply.node_id] = reason
            refused.append(reply.node_id)
        self.strategy.report.accepted = [r.node_id for r in kept_replies]
        if refused and not kept_replies:
            raise PrivacyError(
                f"every reply exceeded privacy.clip-norm = {clip_norm:g} (nodes "
                f"{refused}): client clipping is not active, so privacy.mode = "
                "'client-fixed' would add noise to unbounded updates. Stopping."
            )
        return kept_replies, kept_updates

    def _noisy_fraction(self, unclipped: int, counted: int) -> float:
        """Andrew et al.'s noised unclipped count over the FIXED ``m``."""
        c = self.central
        assert c.expected_clients is not None and self.clipped_count_stddev is not None
        # noisy_unclipped_fraction divides by the clients counted; rescaling by
        # counted / m gives (count + noise) / m with the fixed m, so the clip norm does
        # not depend on how many clients happened to be sampled.
        counted = max(counted, 1)
        return (
            noisy_unclipped_fraction(unclipped, counted, self.clipped_count_stddev, c.rng)
            * counted
            / c.expected_clients
        )

    # ----------------------------------------------------------------------------------
    # Accounting and checkpointing: the central component's, plus the adaptive count's
    # ----------------------------------------------------------------------------------

    def epsilon(self) -> float:
        """epsilon spent so far."""
        return self.central.epsilon()

    def budget_exhausted(self) -> bool:
        """Whether one more round would exceed the budget."""
        return self.central.budget_exhausted()

    def privacy_summary(self) -> dict[str, Any]:
        """What summary.json records about DP."""
        return {"mode": self.mode, **self.central.summary()}

    def state_dict(self) -> dict[str, Any]:
        """The central component's state, the mode and the adaptive count's stddev."""
        return {
            "mode": self.mode,
            "central": self.central.state_dict(),
            "clipped-count-stddev": self.clipped_count_stddev,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; refuses a state from another mode."""
        if state.get("mode") != self.mode:
            raise ValueError(
                f"checkpoint was taken with privacy.mode = {state.get('mode')!r}, not {self.mode!r}"
            )
        self.central.load_state_dict(state["central"])
        self.clipped_count_stddev = state["clipped-count-stddev"]


def _difference(
    state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> AdapterState:
    """``state - reference`` per array, in float64 (clipping must not see rounding)."""
    return {k: state[k].astype(np.float64) - reference[k].astype(np.float64) for k in reference}


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
    client_level: dict[str, Any] | None,
    client_warnings: list[str],
    cfg: RunConfig,
    history: list[dict[str, Any]],
    warnings: list[str],
) -> dict[str, Any]:
    """The ``privacy`` section of summary.json, the same for every aggregation mode.

    ``client_level`` is the run's client-level DP summary (None without it) and
    ``client_warnings`` its DP warnings; ``warnings`` are the run's other DP warnings.
    """
    out: dict[str, Any] = {"warnings": [*client_warnings, *warnings]}
    if client_level is not None:
        out["client-level"] = client_level
    if cfg.privacy.dpsgd:
        # Each site reports its own cumulative epsilon; the weakest site is the guarantee.
        def max_over_sites(name: str) -> float | None:
            key = prefixed("train", name)
            reported = [row[key] for row in history if isinstance(row.get(key), int | float)]
            return max(reported) if reported else None

        out["sample-level"] = {
            "accountant": cfg.privacy.accountant,
            "epsilon-max-over-sites": max_over_sites(wire.DPSGD_EPSILON),
            "pld-epsilon-max-over-sites": max_over_sites(wire.DPSGD_PLD_EPSILON),
            "rdp-epsilon-max-over-sites": max_over_sites(wire.DPSGD_RDP_EPSILON),
            "delta": cfg.privacy.dpsgd_delta,
            "noise-multiplier": cfg.privacy.dpsgd_noise_multiplier,
            "max-grad-norm": cfg.privacy.dpsgd_max_grad_norm,
        }
        if cfg.fed.aggregation == "secagg+":
            # A site's epsilon depends on its data size (q = batch / n_k), which SecAgg+
            # hides: it is not sent, so the server has no maximum to report.
            out["sample-level"]["where"] = (
                "at each site only (SecAgg+ hides per-site values): its log and "
                "<site-state-dir>/<run>/<site>/dpsgd-accountant.json"
            )
    return out
