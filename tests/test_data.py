"""Data pipeline: loading, partitions, splits, prompts, response-only labels, batches."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from flower_llm.config import DataConfig
from flower_llm.data import (
    IGNORE_INDEX,
    ClientData,
    count_response_tokens,
    format_prompt,
    load_records,
    make_dataloader,
    partition,
    prepare_client_data,
    tokenize_dataset,
    train_eval_split,
)
from flower_llm.embedded import DOMAINS, generate_instruction_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A site's own file, with its own column names and an extra column.
SITE_ROWS = [
    {"question": "Is the lamp in the office on?", "answer": "Yes, it is on.", "ward": "a"},
    {"question": "Turn off the fan in the garage.", "answer": "Okay, fan off.", "ward": "b"},
    {"question": "What is the dose of cetirizine?", "answer": "It is 10 mg.", "ward": "a"},
]
SITE_COLUMNS = {"instruction_column": "question", "response_column": "answer"}


def write_site_file(path: Path) -> Path:
    """Write SITE_ROWS in the format named by ``path``'s suffix."""
    import pandas as pd

    if path.suffix == ".json":
        path.write_text(json.dumps(SITE_ROWS))
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in SITE_ROWS) + "\n")
    elif path.suffix == ".csv":
        pd.DataFrame(SITE_ROWS).to_csv(path, index=False)
    else:
        pd.DataFrame(SITE_ROWS).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def embedded_rows() -> Dataset:
    return Dataset.from_list(generate_instruction_dataset())


def row_keys(dataset: Dataset) -> list[tuple[str, str]]:
    return list(zip(dataset["instruction"], dataset["response"], strict=True))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def test_embedded_source_is_the_generated_dataset() -> None:
    # Execute
    records = load_records(DataConfig())

    # Assert
    assert records.to_list() == generate_instruction_dataset()


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_of_every_format_load_identically(tmp_path: Path, suffix: str) -> None:
    # Prepare
    path = write_site_file(tmp_path / f"site{suffix}")
    cfg = DataConfig(**SITE_COLUMNS)

    # Execute
    records = load_records(cfg, data_path=str(path))

    # Assert
    assert records.to_list() == SITE_ROWS


def test_data_path_overrides_the_configured_source(tmp_path: Path) -> None:
    # Prepare: the run-config names a file that does not exist; the node's file does
    path = write_site_file(tmp_path / "site.jsonl")
    cfg = DataConfig(source=str(tmp_path / "elsewhere.jsonl"), **SITE_COLUMNS)

    # Execute
    records = load_records(cfg, data_path=str(path))

    # Assert
    assert list(records["question"]) == [r["question"] for r in SITE_ROWS]


def test_directory_of_data_files_loads(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "site").mkdir()
    write_site_file(tmp_path / "site" / "part.jsonl")

    # Execute
    records = load_records(DataConfig(source=str(tmp_path / "site"), **SITE_COLUMNS))

    # Assert
    assert list(records["answer"]) == [r["answer"] for r in SITE_ROWS]


def test_missing_file_names_the_path_and_the_setting(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "nowhere" / "site-a.jsonl"

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=r"node-config 'data-path'.*site-a\.jsonl"):
        load_records(DataConfig(), data_path=str(missing))
    with pytest.raises(FileNotFoundError, match=r"run-config 'data\.source'.*site-a\.jsonl"):
        load_records(DataConfig(source=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"data/site-b"):
        load_records(DataConfig(source="data/site-b/train"))
    # A bare file name is a file, not a hub id, even though the hub allows dots in ids
    with pytest.raises(FileNotFoundError, match=r"site-c\.csv"):
        load_records(DataConfig(source="site-c.csv"))


def test_hub_id_goes_to_the_hub_not_to_the_file_system() -> None:
    # Prepare: offline, so the hub path fails, but it must be the hub path that fails
    cfg = DataConfig(source="flower-llm-tests/no-such-dataset-v1.2", split="validation")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"Hugging Face dataset id.*'data\.split' = 'validation'"):
        load_records(cfg)


def test_unsupported_file_type_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "site.xml"
    path.write_text("<rows/>")

    # Execute / Assert
    with pytest.raises(ValueError, match=r"unsupported file type '\.xml'.*\.jsonl"):
        load_records(DataConfig(), data_path=str(path))


@pytest.mark.parametrize(
    ("overrides", "column", "key"),
    [
        ({"response_column": "answer"}, "instruction", "data.instruction-column"),
        ({"instruction_column": "question"}, "response", "data.response-column"),
    ],
)
def test_missing_column_names_the_column_the_key_and_the_columns_there_are(
    tmp_path: Path, overrides: dict[str, str], column: str, key: str
) -> None:
    # Prepare
    path = write_site_file(tmp_path / "site.jsonl")

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"'{column}'.*'{key}'.*'question', 'answer', 'ward'"):
        load_records(DataConfig(**overrides), data_path=str(path))


# --------------------------------------------------------------------------------------
# Partitions and splits
# --------------------------------------------------------------------------------------


def test_by_field_gives_each_of_four_sites_a_majority_domain(embedded_rows: Dataset) -> None:
    # Prepare
    cfg = DataConfig(partitioner="by-field", partition_by="domain")

    # Execute
    parts = [partition(embedded_rows, cfg, i, 4, seed=0) for i in range(4)]

    # Assert
    majorities = []
    for part in parts:
        domain, count = Counter(part["domain"]).most_common(1)[0]
        assert count / len(part) >= 0.7, Counter(part["domain"])
        majorities.append(domain)
    assert set(majorities) == set(DOMAINS)
    assert sorted(k for p in parts for k in row_keys(p)) == sorted(row_keys(embedded_rows))


def test_by_field_with_fewer_sites_than_values_leaves_no_value_out(
    embedded_rows: Dataset,
) -> None:
    # Execute
    parts = [partition(embedded_rows, DataConfig(), i, 2, seed=0) for i in range(2)]

    # Assert
    assert sum(len(p) for p in parts) == len(embedded_rows)
    assert set(parts[0]["domain"]) | set(parts[1]["domain"]) == set(DOMAINS)
    assert not set(parts[0]["domain"]) & set(parts[1]["domain"])


def test_iid_partitions_are_disjoint_cover_the_data_and_mix_domains(
    embedded_rows: Dataset,
) -> None:
    # Prepare
    cfg = DataConfig(partitioner="iid")

    # Execute
    parts = [partition(embedded_rows, cfg, i, 3, seed=1) for i in range(3)]
    again = partition(embedded_rows, cfg, 0, 3, seed=1)
    other_seed = partition(embedded_rows, cfg, 0, 3, seed=2)

    # Assert: generated rows repeat, so coverage is compared as multisets
    keyed = Counter(row_keys(embedded_rows))
    assert Counter(k for p in parts for k in row_keys(p)) == keyed
    assert all(len(p) == 300 for p in parts)
    assert all(set(p["domain"]) == set(DOMAINS) for p in parts)
    assert row_keys(again) == row_keys(parts[0])
    assert row_keys(other_seed) != row_keys(parts[0])


def test_dirichlet_partitions_are_disjoint_and_skewed(embedded_rows: Dataset) -> None:
    # Prepare
    cfg = DataConfig(partitioner="dirichlet", dirichlet_alpha=0.3)

    # Execute
    parts = [partition(embedded_rows, cfg, i, 3, seed=0) for i in range(3)]

    # Assert
    assert Counter(k for p in parts for k in row_keys(p)) == Counter(row_keys(embedded_rows))
    shares = [Counter(p["domain"]).most_common(1)[0][1] / len(p) for p in parts]
    assert max(shares) > 0.5, shares


def test_none_partitioner_gives_every_site_everything(embedded_rows: Dataset) -> None:
    # Execute
    part = partition(embedded_rows, DataConfig(partitioner="none"), 2, 4, seed=0)

    # Assert
    assert len(part) == len(embedded_rows)


@pytest.mark.parametrize("partition_id", [-1, 4])
def test_partition_id_out_of_range_is_refused(embedded_rows: Dataset, partition_id: int) -> None:
    with pytest.raises(ValueError, match=rf"partition-id {partition_id} is outside \[0, .*4\)"):
        partition(embedded_rows, DataConfig(), partition_id, 4, seed=0)


def test_partition_by_a_missing_column_names_the_key(embedded_rows: Dataset) -> None:
    with pytest.raises(ValueError, match=r"'data\.partition-by' = 'site'.*'domain'"):
        partition(embedded_rows, DataConfig(partition_by="site"), 0, 2, seed=0)


@pytest.mark.parametrize(("size", "expected_eval"), [(2, 1), (3, 1), (10, 2), (900, 180)])
def test_train_eval_split_is_deterministic_disjoint_and_never_empty(
    size: int, expected_eval: int
) -> None:
    # Prepare
    dataset = Dataset.from_dict({"i": list(range(size))})

    # Execute
    train, held_out = train_eval_split(dataset, eval_fraction=0.2, seed=5)
    train_again, _ = train_eval_split(dataset, eval_fraction=0.2, seed=5)

    # Assert
    assert len(held_out) == expected_eval
    assert sorted([*train["i"], *held_out["i"]]) == list(range(size))
    assert list(train["i"]) == list(train_again["i"])


def test_train_eval_split_refuses_a_single_example() -> None:
    with pytest.raises(ValueError, match="at least 2 examples"):
        train_eval_split(Dataset.from_dict({"i": [0]}), 0.2, seed=0)


# --------------------------------------------------------------------------------------
# Prompts and tokens
# --------------------------------------------------------------------------------------


def test_prompt_template_and_chat_template(tokenizer: Any) -> None:
    # Prepare
    example = {"instruction": "Is the fan on?", "response": "Yes."}

    # Execute
    plain = format_prompt(example, DataConfig(prompt_template="Q: {instruction}\nA: "), tokenizer)
    chat = format_prompt(example, DataConfig(use_chat_template=True), tokenizer)

    # Assert
    assert plain == ("Q: Is the fan on?\nA: ", "Yes.")
    assert chat == ("<|user|> Is the fan on?\n<|assistant|>\n", "Yes.")


@pytest.mark.parametrize("use_chat_template", [False, True])
def test_labels_are_masked_exactly_on_the_prompt(tokenizer: Any, use_chat_template: bool) -> None:
    # Prepare
    cfg = DataConfig(use_chat_template=use_chat_template)
    record = generate_instruction_dataset(num_per_domain=1)[0]
    prompt, response = format_prompt(record, cfg, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]

    # Execute
    [example] = tokenize_dataset([record], tokenizer, cfg)

    # Assert: BOS + prompt are masked, response + EOS are learned
    masked = 1 + len(prompt_ids)
    assert example["input_ids"] == [
        tokenizer.bos_token_id,
        *prompt_ids,
        *response_ids,
        tokenizer.eos_token_id,
    ]
    assert example["labels"] == [IGNORE_INDEX] * masked + example["input_ids"][masked:]
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_a_chat_template_that_writes_bos_gets_no_second_one(tokenizer: Any) -> None:
    # Prepare
    from copy import deepcopy

    with_bos = deepcopy(tokenizer)
    with_bos.chat_template = "{{ bos_token }}{{ messages[0]['content'] }}\n"
    cfg = DataConfig(use_chat_template=True)

    # Execute
    [example] = tokenize_dataset([{"instruction": "hi", "response": "yes"}], with_bos, cfg)

    # Assert
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1
    assert example["input_ids"][0] == tokenizer.bos_token_id


def test_truncation_keeps_max_seq_length_and_drops_examples_without_response(
    tokenizer: Any,
) -> None:
    # Prepare
    cfg = DataConfig(max_seq_length=24)
    records = [
        {"instruction": "Is the fan on?", "response": "Yes. " * 30},  # response cut
        {"instruction": "word " * 40, "response": "Yes."},  # prompt alone is too long
        {"instruction": "Is the fan on?", "response": None},  # empty cell of a CSV
    ]

    # Execute
    examples = tokenize_dataset(records, tokenizer, cfg)

    # Assert
    assert examples.num_dropped == 2
    [kept] = examples
    assert len(kept["input_ids"]) == len(kept["labels"]) == 24
    assert kept["labels"][-1] != IGNORE_INDEX
    assert kept["input_ids"][-1] != tokenizer.eos_token_id  # EOS fell off with the cut


def test_batches_pad_right_and_never_learn_padding(tokenizer: Any) -> None:
    # Prepare
    cfg = DataConfig()
    records = generate_instruction_dataset(num_per_domain=4)
    examples = tokenize_dataset(records, tokenizer, cfg)

    # Execute
    batch = next(iter(make_dataloader(examples, batch_size=12, shuffle=False, seed=0)))

    # Assert
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (12, max(lengths))
    assert len(set(lengths)) > 1, "examples of different lengths should need padding"
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["labels"][row, :n].tolist() == example["labels"]
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    expected = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples)
    assert count_response_tokens(batch) == expected


def test_shuffled_order_depends_only_on_the_seed(tokenizer: Any) -> None:
    # Prepare
    examples = tokenize_dataset(
        generate_instruction_dataset(num_per_domain=10), tokenizer, DataConfig()
    )

    def order(seed: int) -> list[list[int]]:
        loader = make_dataloader(examples, batch_size=30, shuffle=True, seed=seed)
        return next(iter(loader))["input_ids"].tolist()

    # Execute
    torch.manual_seed(0)
    first = order(3)
    torch.manual_seed(1)  # the global RNG must not matter
    second = order(3)

    # Assert
    assert first == second
    assert order(4) != first


def test_a_plain_list_needs_an_explicit_pad_id() -> None:
    examples = [{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [-100, 2]}]
    with pytest.raises(ValueError, match="pad_id"):
        make_dataloader(examples, batch_size=1, shuffle=False, seed=0)
    batch = next(iter(make_dataloader(examples, batch_size=1, shuffle=False, seed=0, pad_id=0)))
    assert count_response_tokens(batch) == 1


# --------------------------------------------------------------------------------------
# One site
# --------------------------------------------------------------------------------------


def test_simulated_site_gets_its_partition_split_and_tokenized(tokenizer: Any) -> None:
    # Execute
    sites = [prepare_client_data(DataConfig(), tokenizer, i, 3, seed=0) for i in range(3)]

    # Assert
    assert all(isinstance(site, ClientData) for site in sites)
    assert [(s.num_train_examples, s.num_eval_examples) for s in sites] == [(240, 60)] * 3
    assert all(site.dropped == 0 for site in sites)
    first_train = {tuple(e["input_ids"]) for e in sites[0].train}
    assert not first_train & {tuple(e["input_ids"]) for e in sites[1].train}


def test_a_site_with_its_own_file_uses_it_whole(tmp_path: Path, tokenizer: Any) -> None:
    # Prepare
    path = write_site_file(tmp_path / "site.csv")
    cfg = DataConfig(eval_fraction=0.34, **SITE_COLUMNS)

    # Execute: partition arguments are ignored for a site's own file
    site = prepare_client_data(cfg, tokenizer, 1, 4, seed=0, data_path=str(path))

    # Assert
    assert (site.num_train_examples, site.num_eval_examples) == (2, 1)
    batch = next(iter(make_dataloader(site.train, batch_size=2, shuffle=False, seed=0)))
    assert count_response_tokens(batch) > 0
