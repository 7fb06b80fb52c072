"""Sample-level DP-SGD with Opacus on the tiny NF4 model: LoRA-only updates, DP-off equals
plain training, the project's accountant (checked against dp-accounting) survives rounds,
empty Poisson batches are stepped and accounted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch

from flower_llm.adapters import adapter_state, apply_lora, load_adapter_state
from flower_llm.config import parse_run_config
from flower_llm.data import Collator, Example
from flower_llm.models import load_base_model, quantized_linear_layers
from flower_llm.privacy import DualAccountant, epsilon_after
from flower_llm.privacy.dpsgd import (
    example_losses,
    poisson_sampling_rate,
    site_accountant,
    train_adapter_dpsgd,
)
from flower_llm.train import token_losses, train_adapter

CPU = torch.device("cpu")


def peft_model(model_dir: Path, **overrides: object) -> Any:
    cfg = parse_run_config({"model.name": str(model_dir), **overrides})  # type: ignore[dict-item]
    base = load_base_model(cfg.model, CPU)
    return apply_lora(base.model, cfg.lora, base.name_or_path)


def random_adapter(model: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-zero A *and* B, so that both get gradients (B = 0 leaves A's gradient at 0)."""
    rng = np.random.default_rng(seed)
    return {
        k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in adapter_state(model).items()
    }


def same_length_examples(vocab: int, n: int, length: int = 20, seed: int = 0) -> list[Example]:
    """Examples whose every token is a response token: equal token counts per example make
    plain training's token mean equal to DP-SGD's mean of per-example means."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": list(ids)})
    return out


def base_fingerprint(model: Any) -> dict[str, torch.Tensor]:
    """Every frozen tensor as ``state_dict`` stores it (4-bit bytes and quantization state).

    bitsandbytes' CPU backend repacks 4-bit weights in place for eval-mode forwards and
    unpacks them in ``state_dict``, so raw ``.data`` is no stable fingerprint; the saved
    form is, and it is what a checkpoint of the base would hold.
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


# --------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------


def test_example_losses_average_each_example_over_its_own_tokens(tiny_model_dir: Path) -> None:
    # Prepare: two examples with 5 and 12 response tokens
    model = peft_model(tiny_model_dir)
    examples = same_length_examples(model.config.vocab_size, 2, length=16)
    examples[0]["labels"] = [-100] * 11 + examples[0]["labels"][11:]
    examples[1]["labels"] = [-100] * 4 + examples[1]["labels"][4:]
    batch = Collator(0)(examples)

    # Execute
    with torch.no_grad():
        per_example = example_losses(model, batch)
        singles = [token_losses(model, Collator(0)([ex]))[0].mean() for ex in examples]

    # Assert
    assert per_example.shape == (2,)
    torch.testing.assert_close(per_example, torch.stack(singles), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# LoRA only (opacus#820) and DP off == plain training
# --------------------------------------------------------------------------------------


def test_one_dpsgd_step_changes_lora_weights_and_nothing_else(tiny_model_dir: Path) -> None:
    # Prepare
    model = peft_model(tiny_model_dir)
    assert quantized_linear_layers(model), "the base must really be 4-bit"
    load_adapter_state(model, random_adapter(model))
    examples = same_length_examples(model.config.vocab_size, 16)
    model.eval()  # as after a round's evaluation: bitsandbytes repacks 4-bit weights
    with torch.no_grad():
        model(input_ids=Collator(0)(examples[:2])["input_ids"])
    base_before = base_fingerprint(model)
    lora_before = adapter_state(model)

    # Execute
    result = train_adapter_dpsgd(
        model,
        examples,
        steps=1,
        batch_size=8,
        learning_rate=1e-2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        pad_id=0,
        seed=0,
    )

    # Assert: every LoRA matrix moved; base layers, norms and embeddings did not
    lora_after = adapter_state(model)
    unchanged = [k for k in lora_before if np.array_equal(lora_before[k], lora_after[k])]
    assert not unchanged, f"DP-SGD left LoRA weights untouched: {unchanged[:3]}"
    base_after = base_fingerprint(model)
    assert base_after.keys() == base_before.keys()
    for name, tensor in base_before.items():
        assert torch.equal(base_after[name], tensor), f"DP-SGD changed frozen {name}"
    assert result.stats.steps == 1
    # Opacus' wrapper is gone: no hooks or per-sample gradients left on the model.
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters())


def test_dpsgd_without_noise_or_clipping_matches_plain_training(tiny_model_dir: Path) -> None:
    # Prepare: one fixed batch of 8 equal-length examples, fp32 LoRA for a tight comparison
    overrides = {"model.compute-dtype": "float32"}
    plain_model = peft_model(tiny_model_dir, **overrides)
    dp_model = peft_model(tiny_model_dir, **overrides)
    start = random_adapter(plain_model, seed=3)
    load_adapter_state(plain_model, start)
    load_adapter_state(dp_model, start)
    examples = same_length_examples(plain_model.config.vocab_size, 8)
    batch = Collator(0)(examples)

    def same_batch():  # type: ignore[no-untyped-def]
        while True:
            yield batch

    # Execute
    train_adapter(plain_model, same_batch(), steps=3, learning_rate=1e-3, max_grad_norm=0.0)
    train_adapter_dpsgd(
        dp_model,
        examples,
        steps=3,
        batch_size=8,
        learning_rate=1e-3,
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        delta=1e-5,
        pad_id=0,
        seed=0,
        poisson_sampling=False,  # the same fixed batch every step, as plain training
    )

    # Assert: the same AdamW trajectory (per-sample sums vs batch gradients differ only
    # in float rounding)
    plain, dp = adapter_state(plain_model), adapter_state(dp_model)
    moved = max(float(np.abs(plain[k] - start[k]).max()) for k in start)
    assert moved > 1e-4, "training should have moved the adapter"
    for key in start:
        np.testing.assert_allclose(dp[key], plain[key], rtol=1e-4, atol=5e-5, err_msg=key)


# --------------------------------------------------------------------------------------
# Accounting across rounds
# --------------------------------------------------------------------------------------


def dp_accounting_pld(sigma: float, q: float, steps: int, delta: float) -> float:
    reference = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    reference.compose(event, steps)
    return float(reference.get_epsilon(delta))


def test_epsilon_accumulates_across_rounds_through_json(tiny_model_dir: Path) -> None:
    # Prepare: RDP as the headline here; the PLD headline is the default everywhere else
    kind = "rdp"
    model = peft_model(tiny_model_dir)
    examples = same_length_examples(model.config.vocab_size, 40)
    settings: dict[str, Any] = dict(
        steps=4, batch_size=8, learning_rate=1e-3, noise_multiplier=1.1, max_grad_norm=1.0
    )

    # Execute: three rounds, the accountant travelling as JSON in between
    state: dict[str, Any] | None = None
    epsilons = []
    for round_seed in range(3):
        result = train_adapter_dpsgd(
            model,
            examples,
            delta=1e-5,
            pad_id=0,
            accountant_state=state,
            accountant=kind,
            seed=round_seed,
            **settings,
        )
        state = json.loads(json.dumps(result.accountant_state, allow_nan=False))
        epsilons.append(result.epsilon)

    # Assert: strictly increasing; after 12 steps at q = 8/40 the PLD epsilon is
    # dp-accounting's and the RDP one is the project's exact RDP, the headline the chosen one
    assert epsilons[0] < epsilons[1] < epsilons[2]
    pld = dp_accounting_pld(1.1, 0.2, 12, 1e-5)
    rdp = epsilon_after(12, 1.1, 0.2, 1e-5, accountant="rdp")
    assert result.epsilons["pld-epsilon"] == pytest.approx(pld, rel=1e-9)
    assert result.epsilons["rdp-epsilon"] == pytest.approx(rdp, rel=1e-12)
    assert result.epsilon == result.epsilons[f"{kind}-epsilon"] == epsilons[-1]
    assert result.epsilons["pld-epsilon"] < result.epsilons["rdp-epsilon"]
    assert state is not None
    resumed = DualAccountant.from_checkpoint(state, kind)
    assert resumed.pld.events == [(1.1, 0.2, 12)]
    assert resumed.epsilon() == epsilons[-1]


def test_a_kept_accountant_at_another_delta_is_refused() -> None:
    kept = DualAccountant("pld", 1.0, 0.1, 1e-5)
    kept.step(3)
    with pytest.raises(ValueError, match="dpsgd-delta"):
        site_accountant(kept.state_dict(), "pld", 1.0, 0.1, 1e-6)


@pytest.mark.parametrize(("n", "batch", "q"), [(40, 8, 0.2), (10, 4, 1 / 3), (3, 5, 1.0)])
def test_the_sampling_rate_is_one_over_the_batches_of_an_epoch(
    n: int, batch: int, q: float
) -> None:
    assert poisson_sampling_rate(n, batch) == pytest.approx(q, rel=1e-15)


def test_empty_poisson_batches_still_step_and_count(tiny_model_dir: Path) -> None:
    # Prepare: 3 examples at rate 1/3 give an empty batch with probability (2/3)^3 ~ 0.3
    model = peft_model(tiny_model_dir)
    examples = same_length_examples(model.config.vocab_size, 3)

    # Execute
    result = train_adapter_dpsgd(
        model,
        examples,
        steps=25,
        batch_size=1,
        learning_rate=1e-3,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        pad_id=0,
        seed=5,
    )

    # Assert: all 25 steps were accounted even though fewer than 25 batches held data
    events = DualAccountant.from_checkpoint(result.accountant_state, "pld").pld.events
    assert events == [(1.0, pytest.approx(1 / 3), 25)]
    assert result.stats.steps == 25
    assert result.stats.examples < 25 * 3


def test_fixed_batches_are_accounted_without_amplification(tiny_model_dir: Path) -> None:
    # Prepare
    model = peft_model(tiny_model_dir)
    examples = same_length_examples(model.config.vocab_size, 16)

    # Execute
    result = train_adapter_dpsgd(
        model,
        examples,
        steps=2,
        batch_size=8,
        learning_rate=1e-3,
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        delta=1e-5,
        pad_id=0,
        seed=0,
        poisson_sampling=False,
    )

    # Assert: q = 1, not Opacus' 1 / len(loader) = 0.5
    events = DualAccountant.from_checkpoint(result.accountant_state, "pld").pld.events
    assert events == [(2.0, 1.0, 2)]
