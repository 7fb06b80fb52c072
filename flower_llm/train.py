"""Local training and evaluation of LoRA adapters. No Flower imports.

A round of local training is a plain function of (model, batches, settings); the
ClientApp only decides which batches and which learning rate.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainStats:
    """What one round of local training did."""

    loss: float
    """Mean loss over response tokens across all steps."""
    steps: int
    examples: int
    """Examples seen, counting repeats (FedAvg's weight with ``fed.weighting = seen``)."""
    tokens: int
    """Response tokens trained on, counting repeats."""
    seconds: float


@dataclass(frozen=True)
class EvalStats:
    """Held-out quality of a model on one client's data."""

    loss: float
    """Mean cross-entropy per response token."""
    perplexity: float
    token_accuracy: float
    """Fraction of response tokens whose arg-max prediction is right."""
    tokens: int
    examples: int


def response_tokens(examples: Iterable[dict[str, list[int]]]) -> int:
    """Response tokens of ``examples``, counted as training counts them.

    Position t predicts token t+1, so a label counts from the second position on: the
    same count :func:`train_adapter` reports for one pass over the examples.
    """
    return sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in examples)


def cycle_batches(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Batches forever: a new pass over ``loader`` (re-shuffled) when one ends."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data loader yields no batch")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def shifted_logits(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (B, T-1, V) and the labels (B, T-1) they predict.

    Position t predicts token t+1, so the last position's logits and the first label drop.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1, :].float(), batch["labels"][:, 1:]


def token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and predictions on response tokens of a causal LM.

    Returns ``(losses, correct)``, both of shape ``(num_response_tokens,)``.
    """
    logits, labels = shifted_logits(model, batch)
    mask = labels != IGNORE_INDEX
    picked_logits = logits[mask]  # (N, V)
    picked_labels = labels[mask]  # (N,)
    losses = F.cross_entropy(picked_logits, picked_labels, reduction="none")
    correct = picked_logits.argmax(dim=-1) == picked_labels
    return losses, correct


def summed_token_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of the per-token losses on response tokens: training needs nothing else.

    The same value as ``token_losses(model, batch)[0].sum()`` without copying the
    response rows out of the logits or taking their argmax; cross-entropy skips the
    ignored positions itself.
    """
    logits, labels = shifted_logits(model, batch)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def train_adapter(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    *,
    steps: int,
    learning_rate: float,
    grad_accum: int = 1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
) -> TrainStats:
    """Run ``steps`` AdamW steps on the trainable (LoRA) parameters of ``model``.

    A fresh optimizer each round is the FedAvg convention: moments from a model that the
    server has since replaced would point the wrong way.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; were LoRA adapters applied?")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model.train()
    start = time.perf_counter()
    loss_sum, token_count, example_count = 0.0, 0, 0
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        micro = [_to_device(b, device) for b in itertools.islice(batches, grad_accum)]
        step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        for batch in micro:
            summed = summed_token_loss(model, batch)
            # Sum over tokens / tokens in the whole step: every response token counts the
            # same, however the step was split into micro-batches.
            (summed / max(step_tokens, 1)).backward()
            loss_sum += float(summed.detach())
            example_count += int(batch["input_ids"].shape[0])
        token_count += step_tokens
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return TrainStats(
        loss=loss_sum / max(token_count, 1),
        steps=steps,
        examples=example_count,
        tokens=token_count,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Batch]) -> EvalStats:
    """Loss, perplexity and token accuracy on response tokens of ``loader``."""
    device = next(model.parameters()).device
    model.eval()
    loss_sum, correct_sum, tokens, examples = 0.0, 0, 0, 0
    for batch in loader:
        losses, correct = token_losses(model, _to_device(batch, device))
        loss_sum += float(losses.sum())
        correct_sum += int(correct.sum())
        tokens += int(losses.numel())
        examples += int(batch["input_ids"].shape[0])
    if tokens == 0:
        raise ValueError("evaluation data holds no response tokens")
    loss = loss_sum / tokens
    return EvalStats(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        token_accuracy=correct_sum / tokens,
        tokens=tokens,
        examples=examples,
    )
