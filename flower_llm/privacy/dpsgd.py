"""Sample-level DP-SGD of LoRA adapters with Opacus: the only module that imports opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") clips the gradient of
every training example to ``max_grad_norm``, sums, adds ``N(0, (sigma * max_grad_norm)^2)``
and averages over the expected batch size; batches are drawn by Poisson sampling so the
RDP accountant (Mironov 2017; Mironov, Talwar & Zhang 2019) can amplify by sampling. What
it protects is one *record* of one site: the adapter a site sends is (epsilon, delta)-DP
with respect to adding or removing one of its training examples.

Glue only, as Opacus' own engine is: the maths is Opacus', the loss is
:func:`flower_llm.train.token_losses`, and the caller keeps the model. Three facts of
Opacus shape the code (see PLATFORM-NOTES):

- A new ``PrivacyEngine`` starts at epsilon 0, so a site's accountant history travels in
  and out of every round as JSON (the ClientApp keeps it in Flower's per-node state).
- Wrapping the same module twice raises "Trying to add hooks twice": the
  ``GradSampleModule`` is closed at the end of every round, whatever happens.
- While wrapped, ``state_dict`` keys gain ``_module.``: adapter weights are read from the
  PEFT model itself, never from the wrapper.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from flower_llm.data import Collator, Example
from flower_llm.train import IGNORE_INDEX, Batch, TrainStats, cycle_batches, token_losses


@dataclass(frozen=True)
class DpSgdResult:
    """One round of DP-SGD on one site."""

    stats: TrainStats
    epsilon: float
    """Sample-level epsilon of this site after the round, over all its rounds so far."""
    delta: float
    accountant_state: str
    """Opacus RDP accountant history as JSON, to hand back next round."""


# --------------------------------------------------------------------------------------
# The accountant across rounds
# --------------------------------------------------------------------------------------


def accountant_from_json(state: str | None) -> RDPAccountant:
    """An Opacus RDP accountant holding the history in ``state`` (fresh when None or "")."""
    accountant = RDPAccountant()
    if state:
        payload = json.loads(state)
        if payload.get("mechanism") != accountant.mechanism():
            raise ValueError(f"accountant state is for {payload.get('mechanism')!r}, not RDP")
        # Opacus keeps (noise_multiplier, sample_rate, num_steps) tuples; JSON gives lists.
        accountant.history = [
            (float(sigma), float(rate), int(steps)) for sigma, rate, steps in payload["history"]
        ]
    return accountant


def accountant_to_json(accountant: RDPAccountant) -> str:
    """The accountant's history as JSON (what Flower's ``ConfigRecord`` can carry)."""
    history = [[float(s), float(q), int(n)] for s, q, n in accountant.history]
    return json.dumps({"mechanism": accountant.mechanism(), "history": history})


def epsilon_of(state: str | None, delta: float) -> float:
    """Epsilon at ``delta`` of a serialised accountant (0 before any step)."""
    accountant = accountant_from_json(state)
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


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
    accountant_state: str | None = None,
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
        As plain local training; ``batch_size / len(examples)`` is the Poisson sampling
        rate, so a batch has ``batch_size`` examples on average.
    noise_multiplier, max_grad_norm : float
        Gaussian noise std relative to ``max_grad_norm``, the per-example L2 bound.
    delta : float
        delta at which the returned epsilon is computed.
    accountant_state : str, optional
        JSON from the previous round's :class:`DpSgdResult`, so epsilon accumulates over
        rounds (every round's steps are on the same dataset).
    seed : int, optional
        Seeds sampling and noise, for tests only. None (the default) takes the seed from
        the operating system: a seed the server knows would let it subtract the noise.
    poisson_sampling : bool
        False keeps the loader's fixed batches (no privacy amplification; tests only).

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
    loader = _poisson_loader(examples, batch_size, pad_id, seed, poisson_sampling)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model.train()  # Opacus refuses to wrap a module in eval mode (as after evaluation)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = accountant_from_json(accountant_state)
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
    return DpSgdResult(
        stats=stats,
        epsilon=float(engine.accountant.get_epsilon(delta)),
        delta=delta,
        accountant_state=accountant_to_json(engine.accountant),
    )


def _poisson_loader(
    examples: list[Example], batch_size: int, pad_id: int, seed: int, poisson: bool
) -> DataLoader[Any]:
    """Batches where each example is in independently with ``q = 1 / ceil(n / batch_size)``.

    Opacus' own ``DPDataLoader`` does the same sampling but cannot build an empty batch
    for dict-of-list examples when the first batch is empty (it calls ``torch.zeros`` with
    Python types). Here an empty draw collates to ``{}`` and :func:`_dp_steps` takes a
    noise-only step. ``len(loader) = 1 / q``, so Opacus' accountant reads the same ``q``.
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
        sample_rate=1.0 / batches_per_epoch,
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
