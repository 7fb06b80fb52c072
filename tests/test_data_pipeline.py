"""Data: file formats, columns, partitions, response-only labels, clear errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from flower_llm.config import parse_run_config
from flower_llm.data import (
    IGNORE_INDEX,
    encode_example,
    load_records,
    make_dataloader,
    partition,
    prepare_client_data,
)
from flower_llm.embedded import build_tiny_model, directory_digest, generate_instruction_dataset

ROWS = [
    {
        "question": "Is the lamp in the office on?",
        "answer": "Checking the office: the lamp is now on.",
    },
    {"question": "Turn off the fan in the garage.", "answer": "Okay, the fan will switch off."},
    {"question": "What is the dose of cetirizine?", "answer": "The usual dose is 10 mg."},
]


def data_cfg(**overrides: object):  # type: ignore[no-untyped-def]
    return parse_run_config(overrides).data  # type: ignore[arg-type]


def write(path: Path, fmt: str) -> Path:
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    if fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_local_files_load_identically(tmp_path: Path, fmt: str) -> None:
    # Prepare
    path = write(tmp_path / f"site.{fmt}", fmt)
    cfg = data_cfg(**{"data.instruction-column": "question", "data.response-column": "answer"})

    # Execute
    records = load_records(cfg, data_path=str(path))

    # Assert
    assert [(r["question"], r["answer"]) for r in records] == [
        (r["question"], r["answer"]) for r in ROWS
    ]


def test_missing_file_names_the_path_and_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "site-a.jsonl"
    with pytest.raises(FileNotFoundError, match=r"data-path.*site-a\.jsonl"):
        load_records(data_cfg(), data_path=str(missing))
    with pytest.raises(FileNotFoundError, match=r"data\.source"):
        load_records(data_cfg(**{"data.source": str(missing)}))


def test_missing_column_names_the_column_the_key_and_what_exists(tmp_path: Path) -> None:
    path = write(tmp_path / "site.jsonl", "jsonl")
    with pytest.raises(ValueError, match=r"'instruction'.*data\.instruction-column.*question"):
        load_records(data_cfg(), data_path=str(path))


def test_labels_mask_the_prompt_and_keep_the_response(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    # Prepare
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, response = "### Instruction:\nIs the fan on?\n\n### Response:\n", "the fan is on."

    # Execute
    example = encode_example(prompt, response, tokenizer, max_len=128)

    # Assert
    assert example is not None
    prompt_len = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert example["labels"][prompt_len:] == [*response_ids, tokenizer.eos_token_id]
    assert example["input_ids"][prompt_len:] == example["labels"][prompt_len:]


def test_truncation_that_leaves_no_response_drops_the_example(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert encode_example("word " * 50, "answer", tokenizer, max_len=8) is None


def test_padding_never_counts_in_the_loss(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = prepare_client_data(data_cfg(), tokenizer, partition_id=0, num_partitions=1, seed=0)
    batch = next(iter(make_dataloader(data.train, 8, shuffle=False, seed=0, pad_id=0)))
    pads = batch["attention_mask"] == 0
    assert pads.any(), "examples of different lengths should need padding"
    assert (batch["labels"][pads] == IGNORE_INDEX).all()


def test_by_field_partitions_give_each_site_one_domain() -> None:
    # Prepare
    from datasets import Dataset

    dataset = Dataset.from_list(generate_instruction_dataset())
    cfg = data_cfg()

    # Execute
    parts = [partition(dataset, cfg, i, 4, seed=0) for i in range(4)]

    # Assert: mostly (here: only) one domain per site, disjoint, all domains covered
    majority = []
    for part in parts:
        domain, count = Counter(part["domain"]).most_common(1)[0]
        assert count / len(part) >= 0.9
        majority.append(domain)
    assert set(majority) == {"medical", "finance", "smart-home"}
    seen = [r["instruction"] + r["response"] for p in parts for r in p]
    assert sum(len(p) for p in parts) == len(dataset)
    assert len(seen) == len(dataset)


def test_iid_partitions_are_disjoint_and_cover_the_data() -> None:
    from datasets import Dataset

    dataset = Dataset.from_list(generate_instruction_dataset(num_per_domain=40))
    cfg = data_cfg(**{"data.partitioner": "iid"})
    parts = [partition(dataset, cfg, i, 3, seed=0) for i in range(3)]
    assert sum(len(p) for p in parts) == len(dataset)
    assert all(len(set(p["domain"])) == 3 for p in parts)


def test_partition_id_out_of_range_is_refused() -> None:
    from datasets import Dataset

    dataset = Dataset.from_list(generate_instruction_dataset(num_per_domain=5))
    with pytest.raises(ValueError, match="partition-id 4"):
        partition(dataset, data_cfg(), 4, 4, seed=0)


def test_embedded_model_and_data_are_deterministic(tmp_path: Path) -> None:
    assert generate_instruction_dataset(seed=1) == generate_instruction_dataset(seed=1)
    assert generate_instruction_dataset(seed=1) != generate_instruction_dataset(seed=2)
    first = build_tiny_model(tmp_path / "a")
    second = build_tiny_model(tmp_path / "b")
    assert directory_digest(first) == directory_digest(second)


def test_chat_template_formatting(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from flower_llm.data import format_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = data_cfg(**{"data.use-chat-template": True})
    prompt, response = format_prompt(
        {"instruction": "Is the fan on?", "response": "yes"}, cfg, tokenizer
    )
    assert prompt.startswith("<|user|> Is the fan on?") and prompt.rstrip().endswith(
        "<|assistant|>"
    )
    assert response == "yes"


def test_training_loss_is_the_sum_of_the_response_token_losses(tiny_model_dir: Path) -> None:
    # Training takes the summed loss without gathering the response rows; it must be the
    # very quantity evaluation reports per token, and its gradient the same.
    import torch

    from flower_llm.adapters import apply_lora
    from flower_llm.models import load_base_model
    from flower_llm.train import summed_token_loss, token_losses

    cfg = parse_run_config({"model.name": str(tiny_model_dir)})
    base = load_base_model(cfg.model, torch.device("cpu"))
    model = apply_lora(base.model, cfg.lora)
    data = prepare_client_data(data_cfg(), base.tokenizer, partition_id=0, num_partitions=1, seed=0)
    batch = next(iter(make_dataloader(data.train, 4, shuffle=False, seed=0, pad_id=0)))
    lora = [p for p in model.parameters() if p.requires_grad]

    summed = summed_token_loss(model, batch)
    grads_summed = torch.autograd.grad(summed, lora)
    losses, _ = token_losses(model, batch)
    grads_gathered = torch.autograd.grad(losses.sum(), lora)

    n_response = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert losses.numel() == n_response > 0
    torch.testing.assert_close(summed, losses.sum(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_summed, grads_gathered, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
