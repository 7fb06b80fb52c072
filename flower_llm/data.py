"""Instruction data: load, partition, split, format and tokenize. No Flower app code.

Flow for one site: :func:`load_records` (a file, a hub dataset or the embedded default)
-> :func:`partition` (simulation only: a site's own file is used whole) ->
:func:`train_eval_split` -> :func:`tokenize_dataset` (loss on response tokens only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader

from flower_llm.config import EMBEDDED, DataConfig

IGNORE_INDEX = -100
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

Example = dict[str, list[int]]


@dataclass(frozen=True)
class ClientData:
    """One site's tokenized training and held-out examples."""

    train: list[Example]
    eval: list[Example]
    dropped: int
    """Examples with no response token left after truncation."""

    @property
    def num_train_examples(self) -> int:
        """Training examples."""
        return len(self.train)

    @property
    def num_eval_examples(self) -> int:
        """Held-out examples."""
        return len(self.eval)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    return Path(source).suffix != "" or source.startswith((".", "/", "~"))


def load_records(cfg: DataConfig, data_path: str | None = None) -> Dataset:
    """Load the instruction/response records a site trains on.

    ``data_path`` (a SuperNode's node-config ``data-path``) overrides ``data.source``.
    A path that does not exist is an error; a string that is not a path is taken as a
    Hugging Face dataset id (``load_dataset(id, split=data.split)``).
    """
    source = data_path or cfg.source
    origin = "node-config 'data-path'" if data_path else "run-config 'data.source'"
    if source == EMBEDDED:
        from flower_llm.embedded import generate_instruction_dataset

        dataset = Dataset.from_list(generate_instruction_dataset())
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        fmt = LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"{origin} = {source!r}: unsupported file type '{path.suffix}', "
                f"use one of {', '.join(sorted(LOCAL_FORMATS))}"
            )
        dataset = load_dataset(fmt, data_files=str(path), split="train")
    elif _looks_like_path(source):
        raise FileNotFoundError(f"{origin} = {source!r}: no such data file")
    else:
        dataset = load_dataset(source, split=cfg.split)
    _check_columns(dataset, cfg, origin, source)
    return dataset


def _check_columns(dataset: Dataset, cfg: DataConfig, origin: str, source: str) -> None:
    for key, column in (
        ("data.instruction-column", cfg.instruction_column),
        ("data.response-column", cfg.response_column),
    ):
        if column not in dataset.column_names:
            raise ValueError(
                f"{origin} = {source!r} has no column '{column}' (run-config '{key}'); "
                f"its columns are {dataset.column_names}"
            )
    if len(dataset) == 0:
        raise ValueError(f"{origin} = {source!r} holds no records")


# --------------------------------------------------------------------------------------
# Partitioning and splitting
# --------------------------------------------------------------------------------------


def partition(
    dataset: Dataset, cfg: DataConfig, partition_id: int, num_partitions: int, seed: int
) -> Dataset:
    """The share of ``dataset`` that simulated site ``partition_id`` holds.

    ``by-field`` gives each site the rows of one value of ``data.partition-by`` (site i
    gets value i mod #values; sites with the same value split its rows): the non-IID
    "each hospital has its own kind of patient" setting. ``dirichlet`` mixes values with
    proportions drawn from Dir(``data.dirichlet-alpha``); ``iid`` shuffles evenly.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    if cfg.partitioner == "none" or num_partitions == 1:
        return dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if (
        cfg.partitioner in ("by-field", "dirichlet")
        and cfg.partition_by not in dataset.column_names
    ):
        raise ValueError(
            f"run-config 'data.partition-by' = {cfg.partition_by!r} is not a column; "
            f"columns are {dataset.column_names}"
        )
    partitioner: Any
    if cfg.partitioner == "iid":
        # flwr-datasets' IidPartitioner cuts contiguous shards: shuffle first, or a
        # file sorted by domain would give each site one domain.
        dataset = dataset.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif cfg.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.partition_by,
            alpha=cfg.dirichlet_alpha,
            min_partition_size=2,
            seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.partition_by,
            num_classes_per_partition=1,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    partitioner.dataset = dataset
    return partitioner.load_partition(partition_id)


def train_eval_split(dataset: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic held-out split with at least one example on each side."""
    if len(dataset) < 2:
        raise ValueError(f"a site needs at least 2 examples to hold one out, has {len(dataset)}")
    num_eval = min(max(1, round(len(dataset) * eval_fraction)), len(dataset) - 1)
    split = dataset.train_test_split(test_size=num_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


# --------------------------------------------------------------------------------------
# Prompts and tokens
# --------------------------------------------------------------------------------------


def format_prompt(example: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """``(prompt, response)`` text of one record."""
    instruction = str(example[cfg.instruction_column])
    response = str(example[cfg.response_column])
    if cfg.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "run-config 'data.use-chat-template' is set but the tokenizer has none"
            )
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
        return str(prompt), response
    return cfg.prompt_template.format(instruction=instruction), response


def encode_example(prompt: str, response: str, tokenizer: Any, max_len: int) -> Example | None:
    """Token ids with labels masked (-100) on the prompt; None if no response token fits."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"]]
    if tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    input_ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_dataset(
    dataset: Dataset, tokenizer: Any, cfg: DataConfig
) -> tuple[list[Example], int]:
    """Encode every record; returns the examples and how many were dropped by truncation."""
    examples, dropped = [], 0
    for record in dataset:
        prompt, response = format_prompt(record, cfg, tokenizer)
        encoded = encode_example(prompt, response, tokenizer, cfg.max_seq_length)
        if encoded is None:
            dropped += 1
        else:
            examples.append(encoded)
    return examples, dropped


class Collator:
    """Right-pads a list of examples to the longest; pads never count in the loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Stack ``batch`` into (B, T) tensors."""
        width = max(len(ex["input_ids"]) for ex in batch)

        def padded(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([ex[key] + [fill] * (width - len(ex[key])) for ex in batch])

        return {
            "input_ids": padded("input_ids", self.pad_id),
            "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX),
        }


def make_dataloader(
    examples: list[Example], batch_size: int, shuffle: bool, seed: int, pad_id: int = 0
) -> DataLoader[Any]:
    """Batches of ``examples``; the order depends only on ``seed``."""
    if not examples:
        raise ValueError("no examples to batch")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        examples,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=Collator(pad_id),
    )


def prepare_client_data(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    partition_id: int,
    num_partitions: int,
    seed: int,
    data_path: str | None = None,
) -> ClientData:
    """Load, partition (unless the site has its own file), split and tokenize."""
    records = load_records(cfg, data_path)
    if data_path is None:
        records = partition(records, cfg, partition_id, num_partitions, seed)
    train, held_out = train_eval_split(records, cfg.eval_fraction, seed)
    train_examples, dropped_train = tokenize_dataset(train, tokenizer, cfg)
    eval_examples, dropped_eval = tokenize_dataset(held_out, tokenizer, cfg)
    if not train_examples or not eval_examples:
        raise ValueError(
            "no example keeps a response token after truncation to "
            f"data.max-seq-length = {cfg.max_seq_length}"
        )
    return ClientData(train_examples, eval_examples, dropped_train + dropped_eval)
