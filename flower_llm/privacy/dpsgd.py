"""Sample-level DP-SGD of LoRA adapters with Opacus: the only module that imports opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") clips the gradient of
every training example to ``max_grad_norm``, sums, adds ``N(0, (sigma * max_grad_norm)^2)``
and averages over the expected batch size; batches are drawn by Poisson sampling so the
accountant can amplify by sampling. What it protects is one *record* of one site: the
adapter a site sends is (epsilon, delta)-DP with respect to adding or removing one of its
training examples.

Glue only, as Opacus' own engine is: the mechanism is Opacus', the loss is
:func:`flower_llm.train.token_losses`, and the caller keeps the model. Accounting is NOT
Opacus': every optimizer step Opacus' hook records is composed into this project's
:class:`~flower_llm.privacy.accounting.DualAccountant` (PLD or RDP headline, both reported),
the same accountant as the server's client-level DP. Three facts of Opacus shape the code
(see PLATFORM-NOTES):

- A new ``PrivacyEngine`` starts at epsilon 0, so a site's accountant state travels in and
  out of every round (the ClientApp keeps it in the site's state store, which outlives the
  run, so a resumed run continues each site's epsilon).
- Wrapping the same module twice raises "Trying to add hooks twice": the
  ``GradSampleModule`` is closed at the end of every round, whatever happens.
- While wrapped, ``state_dict`` keys gain ``_module.``: adapter weights are read from the
  PEFT model itself, never from the wrapper.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from flower_llm.data import Collator, Example
from flower_llm.privacy.accounting import DualAccountant, epsilons
from flower_llm.train import IGNORE_INDEX, Batch, TrainStats, cycle_batches, token_losses


@dataclass(frozen=True)
class DpSgdResult:
    """One round of DP-SGD on one site."""

    stats: TrainStats
    epsilon: float
    """Sample-level epsilon of this site after the round, over all its rounds so far, by the
    headline accountant (``privacy.accountant``)."""
    epsilons: dict[str, float]
    """``epsilon``, ``pld-epsilon`` and ``rdp-epsilon``: both accountants' numbers."""
    delta: float
    accountant_state: dict[str, Any]
    """The site's accountant (:meth:`DualAccountant.state_dict`), to hand back next round."""


# --------------------------------------------------------------------------------------
# The accountant across rounds
# --------------------------------------------------------------------------------------


def site_accountant(
    state: Mapping[str, Any] | None,
    kind: str,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
) -> DualAccountant:
    """The site's accountant: continued from ``state``, or fresh when it is None.

    Raises
    ------
    ValueError
        If ``state`` is malformed, or was accounted at another delta (its epsilons would not
        be comparable with this round's).
    """
    if state is None:
        return DualAccountant(kind, noise_multiplier, sampling_rate, delta)
    accountant = DualAccountant.from_checkpoint(state, kind)
    if not math.isclose(accountant.delta, delta, rel_tol=1e-12):
        raise ValueError(
            f"privacy.dpsgd-delta is {delta} but this site's kept accountant reports at "
            f"delta {accountant.delta}"
        )
    return accountant


def poisson_sampling_rate(num_examples: int, batch_size: int) -> float:
    """``q = 1 / ceil(n / batch_size)``: each example's chance to be in one step's batch.

    Opacus' ``DPDataLoader`` uses the same rate (one over the batches of an epoch); it equals
    ``batch_size / n`` when ``batch_size`` divides ``n`` and is slightly larger otherwise.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(
            f"need at least one example and batch_size >= 1, got {num_examples}, {batch_size}"
        )
    return 1.0 / math.ceil(num_examples / batch_size)


# --------------------------------------------------------------------------------------
# Loss and training
# --------------------------------------------------------------------------------------


def example_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean response-token loss of each example, shape ``(B,)``.

    DP-SGD bounds each *example's* gradient, so the loss must split into per-example
    terms that depend on that example alone. The token-weighted mean of plain training
    divides by the tokens of the whole batch, which ties every example's gradient to the
    others' lengths; here each example averages over its own tokens instead.
    """
    losses, _ = token_losses(model, batch)  # (N,) over response tokens, row-major
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
    rows = mask.nonzero()[:, 0]  # (N,): which example each response token belongs to
    batch_size = batch["input_ids"].shape[0]
    sums = torch.zeros(batch_size, dtype=losses.dtype, device=losses.device)
    sums = sums.index_add(0, rows, losses)
    return sums / mask.sum(dim=1).clamp(min=1).to(losses.dtype)


def _unpredictable_seed() -> int:
    # Noise and Poisson sampling must be secret to whoever sees the adapter: seeding them
    # from the run-config seed (public) would let the server subtract the noise.
    return int.from_bytes(os.urandom(8), "little") & (2**63 - 1)


def train_adapter_dpsgd(
    model: torch.nn.Module,
    examples: list[Example],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    pad_id: int,
    weight_decay: float = 0.0,
    accountant_state: Mapping[str, Any] | None = None,
    accountant: str = "pld",
    seed: int | None = None,
    poisson_sampling: bool = True,
) -> DpSgdResult:
    """Run ``steps`` DP-SGD (AdamW) steps on the trainable (LoRA) parameters of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The PEFT model; only parameters with ``requires_grad`` (the LoRA matrices) train
        and get per-sample gradients. It is wrapped for the round and unwrapped after.
    examples : list of Example
        The site's tokenized training examples: the dataset whose records are protected.
    steps, batch_size, learning_rate, weight_decay
        As plain local training; :func:`poisson_sampling_rate` (``batch_size / n`` when it
        divides) is each example's chance to be in a step's batch.
    noise_multiplier, max_grad_norm : float
        Gaussian noise std relative to ``max_grad_norm``, the per-example L2 bound.
    delta : float
        delta at which the returned epsilon is computed.
    accountant_state : mapping, optional
        ``accountant_state`` of the previous round's :class:`DpSgdResult`, so epsilon
        accumulates over rounds (every round's steps are on the same dataset).
    accountant : str
        ``"pld"`` or ``"rdp"`` (``privacy.accountant``): whose epsilon is the headline.
    seed : int, optional
        Seeds sampling and noise, for tests only. None (the default) takes the seed from
        the operating system: a seed the server knows would let it subtract the noise.
    poisson_sampling : bool
        False keeps the loader's fixed batches (tests only); then every step is accounted
        at ``q = 1``, which is valid without any amplification by sampling.

    Returns
    -------
    DpSgdResult
        Training statistics, the site's cumulative epsilon and the accountant to keep.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; were LoRA adapters applied?")
    device = params[0].device
    seed = _unpredictable_seed() if seed is None else seed
    rate = poisson_sampling_rate(len(examples), batch_size) if poisson_sampling else 1.0
    kept = site_accountant(accountant_state, accountant, noise_multiplier, rate, delta)
    loader = _poisson_loader(examples, batch_size, pad_id, seed, poisson_sampling)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model.train()  # Opacus refuses to wrap a module in eval mode (as after evaluation)
    # Opacus' own accountant starts empty and only records the steps its hook sees; they
    # are composed into ``kept`` below.
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: we say so in docs/privacy.md instead.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure.*RNG.*")
        private_model, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,  # the loader already samples, see _poisson_loader
            noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
    try:
        stats = _dp_steps(private_model, dp_optimizer, dp_loader, steps, device)
    finally:
        # Unwrap even on error: the next round wraps the same PEFT model again.
        private_model._close()
    _account_steps(kept, engine.accountant.history, steps, rate)
    return DpSgdResult(
        stats=stats,
        epsilon=kept.epsilon(),
        epsilons=epsilons(kept),
        delta=delta,
        accountant_state=kept.state_dict(),
    )


def _account_steps(
    accountant: DualAccountant,
    history: list[tuple[float, float, int]],
    steps: int,
    sampling_rate: float,
) -> None:
    """Compose the noisy steps Opacus' optimizer hook recorded, at the rate that was sampled.

    The hook fires once per noised optimizer step, so its history counts exactly the steps
    that released something; it must be all ``steps`` (empty batches included). Its rate is
    ``1 / len(loader)``, the Poisson rate, which is replaced by ``sampling_rate``
    (``q = 1`` without Poisson sampling).
    """
    recorded = sum(count for _, _, count in history)
    if recorded != steps:
        raise RuntimeError(f"Opacus recorded {recorded} noisy steps for {steps} training steps")
    for noise_multiplier, _, count in history:
        accountant.step(count, noise_multiplier=noise_multiplier, sampling_rate=sampling_rate)


def _poisson_loader(
    examples: list[Example], batch_size: int, pad_id: int, seed: int, poisson: bool
) -> DataLoader[Any]:
    """Batches where each example is in independently with ``q = 1 / ceil(n / batch_size)``.

    Opacus' own ``DPDataLoader`` does the same sampling but cannot build an empty batch
    for dict-of-list examples when the first batch is empty (it calls ``torch.zeros`` with
    Python types). Here an empty draw collates to ``{}`` and :func:`_dp_steps` takes a
    noise-only step. ``len(loader) = 1 / q``, so Opacus' hook records the same ``q``.
    """
    collate = Collator(pad_id)
    generator = torch.Generator().manual_seed(seed)
    if not poisson:
        return DataLoader(
            examples,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=False,
            collate_fn=collate,
        )
    batches_per_epoch = math.ceil(len(examples) / batch_size)
    sampler = UniformWithReplacementSampler(
        num_samples=len(examples),
        sample_rate=poisson_sampling_rate(len(examples), batch_size),
        generator=generator,
        steps=batches_per_epoch,
    )
    return DataLoader(
        examples,  # type: ignore[arg-type]
        batch_sampler=sampler,
        collate_fn=lambda rows: collate(rows) if rows else {},
    )


def _dp_steps(
    private_model: Any, optimizer: Any, loader: DataLoader[Any], steps: int, device: torch.device
) -> TrainStats:
    """The Opacus training loop: one optimizer step per (Poisson) batch, empty ones too."""
    private_model.train()
    start = time.perf_counter()
    loss_sum, token_count, example_count = 0.0, 0, 0
    batches = cycle_batches(loader)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        raw = next(batches)
        if not raw:  # an empty Poisson draw
            _noise_only_step(optimizer)
            continue
        batch = {k: v.to(device) for k, v in raw.items()}
        per_example = example_losses(private_model, batch)  # (B,)
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)  # (B,)
        # Mean over the actual batch: Opacus' loss_reduction="mean" rescales per-sample
        # gradients by the batch size and divides their clipped sum by the expected one.
        (per_example.sum() / per_example.numel()).backward()
        optimizer.step()
        # Report the token-weighted loss, as plain training does.
        loss_sum += float((per_example.detach() * tokens).sum())
        example_count += int(per_example.numel())
        token_count += int(tokens.sum())
    optimizer.zero_grad(set_to_none=True)
    return TrainStats(
        loss=loss_sum / max(token_count, 1),
        steps=steps,
        examples=example_count,
        tokens=token_count,
        seconds=time.perf_counter() - start,
    )


def _noise_only_step(optimizer: Any) -> None:
    """Step on an empty Poisson batch: the update is pure noise, and it is accounted.

    Poisson sampling draws an empty batch with probability ``(1 - q)^n``. The model cannot
    run on zero rows, but skipping the step would make the number of noisy steps depend
    on the data, which the accountant does not model; zero per-sample gradients give
    Opacus' clip-sum-noise step exactly the empty sum it expects.
    """
    for param in optimizer.params:
        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    optimizer.step()
