"""Instruction data: load, partition, split, format and tokenize. No Flower app code.

Flow for one site (:func:`prepare_client_data`): :func:`load_records` (a file, a hub
dataset or the embedded default) -> :func:`partition` (simulation only: a site's own
file is used whole) -> :func:`train_eval_split` -> :func:`tokenize_dataset` (loss on
response tokens only) -> :func:`make_dataloader` (right-padded batches).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader

from flower_llm.config import EMBEDDED, DataConfig

IGNORE_INDEX = -100
"""Label of tokens that do not count in the loss (PyTorch's cross-entropy default)."""

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> ``datasets`` builder for a site's own file."""

# Suffixes that mark a string as a file name rather than a hub id, even when the file is
# missing (hub ids can contain dots, e.g. `org/data-v1.2`, so not every suffix counts).
_FILE_SUFFIXES = {*LOCAL_FORMATS, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".xlsx"}
# `name` or `namespace/name`, as the hub spells dataset ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

Example = dict[str, list[int]]
"""One tokenized example: ``input_ids``, ``attention_mask`` and ``labels``, same length."""


class TokenizedExamples(list[Example]):
    """Tokenized examples (a plain list, usable as a DataLoader dataset) and how they were made.

    Parameters
    ----------
    examples : Iterable[Example]
        The examples kept.
    num_dropped : int
        Records left out: no response token survived truncation, or a value was missing.
    pad_id : int
        The tokenizer's padding id, so :func:`make_dataloader` needs no tokenizer.
    """

    def __init__(self, examples: Iterable[Example], num_dropped: int, pad_id: int) -> None:
        super().__init__(examples)
        self.num_dropped = num_dropped
        self.pad_id = pad_id


@dataclass(frozen=True)
class ClientData:
    """One site's tokenized training and held-out examples."""

    train: list[Example]
    """Training examples (a :class:`TokenizedExamples` from :func:`prepare_client_data`)."""
    eval: list[Example]
    """Held-out examples, never trained on."""
    dropped: int
    """Records of this site left out by :func:`tokenize_dataset`, train and held-out."""

    @property
    def num_train_examples(self) -> int:
        """Training examples (FedAvg's weight with ``fed.weighting = examples``)."""
        return len(self.train)

    @property
    def num_eval_examples(self) -> int:
        """Held-out examples."""
        return len(self.eval)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _looks_like_local_path(source: str) -> bool:
    """Whether a string that names no existing file was meant as one (vs a hub id)."""
    if source.startswith((".", "/", "~", "\\")) or "\\" in source:
        return True
    if Path(source).suffix.lower() in _FILE_SUFFIXES:
        return True
    return _HUB_ID.fullmatch(source) is None


def load_records(cfg: DataConfig, data_path: str | None = None) -> Dataset:
    """Load the instruction/response records a site trains on.

    Parameters
    ----------
    cfg : DataConfig
        ``data.source``, the column names and ``data.split``.
    data_path : str | None
        A SuperNode's node-config ``data-path``; overrides ``data.source``.

    Returns
    -------
    Dataset
        All records of the source, in file order.

    Raises
    ------
    FileNotFoundError
        The source looks like a file path but there is nothing there.
    ValueError
        Unsupported file type, a configured column is missing, or no records.

    Notes
    -----
    ``embedded`` is :func:`flower_llm.embedded.generate_instruction_dataset`. Local
    ``.json``/``.jsonl``/``.csv``/``.parquet`` files and directories of such files load
    through ``datasets.load_dataset``; any other string is a Hugging Face dataset id,
    loaded with ``load_dataset(id, split=data.split)``.
    """
    source = data_path or cfg.source
    origin = "node-config 'data-path'" if data_path else "run-config 'data.source'"
    path = Path(source).expanduser()
    if source == EMBEDDED:
        from flower_llm.embedded import generate_instruction_dataset

        dataset = Dataset.from_list(generate_instruction_dataset())
    elif path.is_dir():
        # A folder of data files: `datasets` infers the format from the files in it.
        dataset = load_dataset(str(path), split=cfg.split)
    elif path.is_file():
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{origin} = {source!r}: unsupported file type '{path.suffix}', "
                f"use one of {', '.join(sorted(LOCAL_FORMATS))}"
            )
        # A single local file is always the builder's "train" split, whatever data.split.
        dataset = load_dataset(builder, data_files=str(path), split="train")
    elif _looks_like_local_path(source):
        raise FileNotFoundError(f"{origin} = {source!r}: no such data file ({path.absolute()})")
    else:
        try:
            dataset = load_dataset(source, split=cfg.split)
        except Exception as err:
            # `datasets` raises many types (offline, unknown id, bad split); the site's
            # operator needs to know which setting led here.
            raise ValueError(
                f"{origin} = {source!r} is not a local file, and loading it as a Hugging "
                f"Face dataset id with run-config 'data.split' = {cfg.split!r} failed: {err}"
            ) from err
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


class DataError(ValueError):
    """A site's data cannot be used: the message names the file or key and what to change."""


def _check_file_text(path: Path, origin: str, source: str) -> None:
    """Refuse an empty, non-UTF-8 or unparsable text data file, naming file and line.

    ``datasets`` reports these as a bare StopIteration or "An error occurred while
    generating the dataset", without the file.
    """
    raw = path.read_bytes()
    where = f"{origin} = {source!r}"
    if not raw.strip():
        raise DataError(f"{where}: the file is empty ({path})")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".csv"):
        return
    for number, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            raw_line.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = raw_line[err.start : err.start + 1].hex()
            raise DataError(
                f"{where}: line {number} is not UTF-8 (byte 0x{bad} at column {err.start + 1}; "
                f"{path}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
    text = raw.decode("utf-8")
    if suffix == ".csv":
        rows = [line for line in text.splitlines() if line.strip()]
        if len(rows) < 2:
            raise DataError(f"{where}: the CSV file has a header but no rows ({path})")
    elif suffix == ".jsonl":
        import json

        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: line {number} is not JSON ({err.msg}; {path})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: line {number} is a JSON {type(record).__name__}, not an object "
                    f"with the instruction and response columns ({path})"
                )


def check_site_data(
    cfg: DataConfig,
    data_path: str | None = None,
    partition_id: int = 0,
    num_partitions: int = 1,
    seed: int = 0,
) -> int:
    """Check a site's data before anything heavy loads; return its number of records.

    Reads the source (no tokenizer, no model): the file exists, is non-empty, UTF-8 and
    parses; the instruction and response columns exist; and this site's partition has
    at least 2 records, one to train on and one to hold out.

    Raises
    ------
    DataError, FileNotFoundError
        One message naming the file or run-config key, the numbers, and what to change.
    """
    source = data_path or cfg.source
    origin = "node-config 'data-path'" if data_path else "run-config 'data.source'"
    path = Path(source).expanduser()
    if source != EMBEDDED and path.is_file():
        _check_file_text(path, origin, source)
    try:
        records = load_records(cfg, data_path)
    except (DataError, FileNotFoundError):
        raise
    except ValueError as err:
        raise DataError(str(err)) from None
    except Exception as err:  # datasets' generation errors hide their cause in __cause__
        cause = err.__cause__ or err
        raise DataError(f"{origin} = {source!r} cannot be read: {cause}") from None
    if data_path is not None or cfg.partitioner == "none" or num_partitions == 1:
        mine = len(records)
    else:
        if len(records) < 2 * num_partitions:
            raise DataError(_too_few(origin, source, len(records), num_partitions))
        try:
            mine = len(partition(records, cfg, partition_id, num_partitions, seed))
        except IndexError as err:  # flwr-datasets: "Index 3 out of range for dataset..."
            raise DataError(_too_few(origin, source, len(records), num_partitions)) from err
        except ValueError as err:
            raise DataError(str(err)) from None
    if mine < 2:
        raise DataError(
            _too_few(origin, source, len(records), num_partitions)
            + f"; site {partition_id} got {mine}"
        )
    return len(records)


def _too_few(origin: str, source: str, rows: int, num_partitions: int) -> str:
    return (
        f"{origin} = {source!r} has {rows} records for {num_partitions} simulated sites; "
        f"each site needs at least 2 (one to train on, one held out): use at least "
        f"{2 * num_partitions} records or fewer sites (num-supernodes)"
    )


# --------------------------------------------------------------------------------------
# Partitioning and splitting
# --------------------------------------------------------------------------------------


def partition(
    dataset: Dataset, cfg: DataConfig, partition_id: int, num_partitions: int, seed: int
) -> Dataset:
    """The share of ``dataset`` that simulated site ``partition_id`` holds.

    Parameters
    ----------
    dataset : Dataset
        The whole source.
    cfg : DataConfig
        ``data.partitioner``, ``data.partition-by`` and ``data.dirichlet-alpha``.
    partition_id : int
        This site, in ``[0, num_partitions)``.
    num_partitions : int
        Number of simulated sites.
    seed : int
        Same seed, same partitions.

    Returns
    -------
    Dataset
        This site's records. Except with ``none``, the partitions of all sites are
        disjoint and together hold every record.

    Notes
    -----
    - ``iid``: a seeded shuffle cut into equal shards.
    - ``by-field``: the non-IID "each hospital has its own kind of patient" setting. With
      at least as many sites as values of ``data.partition-by``, site ``i`` holds only the
      ``i mod #values``-th value (sorted), and sites sharing a value split its rows
      (flwr-datasets' ``PathologicalPartitioner``). With fewer sites than values, site
      ``i`` holds the values ``i, i + #sites, ...``, so no value is left out.
    - ``dirichlet``: per-site value proportions drawn from Dir(``data.dirichlet-alpha``).
    - ``none``: every site holds the whole dataset.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside [0, num-partitions = {num_partitions})"
        )
    if cfg.partitioner == "none" or num_partitions == 1:
        return dataset
    if cfg.partitioner == "iid":
        return _iid_partition(dataset, partition_id, num_partitions, seed)
    if cfg.partition_by not in dataset.column_names:
        raise ValueError(
            f"run-config 'data.partition-by' = {cfg.partition_by!r} is not a column of the "
            f"data (needed by data.partitioner = {cfg.partitioner!r}); "
            f"its columns are {dataset.column_names}"
        )
    if cfg.partitioner == "dirichlet":
        return _dirichlet_partition(dataset, cfg, partition_id, num_partitions, seed)
    return _by_field_partition(dataset, cfg.partition_by, partition_id, num_partitions, seed)


def _iid_partition(dataset: Dataset, partition_id: int, num_partitions: int, seed: int) -> Dataset:
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_partitions)
    # IidPartitioner cuts contiguous shards: shuffle first, or a file sorted by domain
    # (as the embedded one is) would give each site a single domain.
    partitioner.dataset = dataset.shuffle(seed=seed)
    return partitioner.load_partition(partition_id)


def _by_field_partition(
    dataset: Dataset, column: str, partition_id: int, num_partitions: int, seed: int
) -> Dataset:
    values = sorted(set(dataset[column]))
    if num_partitions < len(values):
        # PathologicalPartitioner would drop the values no site was dealt; deal them
        # round-robin instead, so every record still belongs to some site.
        mine = set(values[partition_id::num_partitions])
        return dataset.select([i for i, v in enumerate(dataset[column]) if v in mine])

    from flwr_datasets.partitioner import PathologicalPartitioner

    partitioner = PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by=column,
        num_classes_per_partition=1,
        # Site i gets value i mod #values: every value has a site, assignment is stable.
        class_assignment_mode="first-deterministic",
        seed=seed,
    )
    partitioner.dataset = dataset
    return partitioner.load_partition(partition_id)


def _dirichlet_partition(
    dataset: Dataset, cfg: DataConfig, partition_id: int, num_partitions: int, seed: int
) -> Dataset:
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=cfg.partition_by,
        alpha=cfg.dirichlet_alpha,
        # Two rows: one to train on and one to hold out.
        min_partition_size=2,
        seed=seed,
    )
    partitioner.dataset = dataset
    try:
        return partitioner.load_partition(partition_id)
    except ValueError as err:
        raise ValueError(
            f"data.partitioner = 'dirichlet' could not give each of {num_partitions} sites "
            f"at least 2 of {len(dataset)} records with run-config 'data.dirichlet-alpha' = "
            f"{cfg.dirichlet_alpha}: raise the alpha or use fewer sites ({err})"
        ) from err


def train_eval_split(dataset: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic held-out split with at least one example on each side.

    Parameters
    ----------
    dataset : Dataset
        A site's records (at least 2).
    eval_fraction : float
        Fraction held out, rounded, then clamped to ``[1, len(dataset) - 1]``.
    seed : int
        Same seed, same split.

    Returns
    -------
    tuple[Dataset, Dataset]
        ``(train, held_out)``.
    """
    if len(dataset) < 2:
        raise ValueError(f"a site needs at least 2 examples to hold one out, has {len(dataset)}")
    num_eval = min(max(1, round(len(dataset) * eval_fraction)), len(dataset) - 1)
    split = dataset.train_test_split(test_size=num_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


# --------------------------------------------------------------------------------------
# Prompts and tokens
# --------------------------------------------------------------------------------------


def format_prompt(example: Mapping[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[str, str]:
    """The ``(prompt, response)`` text of one record.

    Parameters
    ----------
    example : Mapping[str, Any]
        A record with ``data.instruction-column`` and ``data.response-column``.
    cfg : DataConfig
        ``data.prompt-template`` or, with ``data.use-chat-template``, the tokenizer's chat
        template (one user turn, then the assistant's generation prompt).
    tokenizer : Any
        Needed only for the chat template.

    Returns
    -------
    tuple[str, str]
        The prompt, which the loss ignores, and the response, which it learns.
    """
    instruction = str(example[cfg.instruction_column])
    response = str(example[cfg.response_column])
    if cfg.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "run-config 'data.use-chat-template' is true but the tokenizer has no chat "
                "template; set it to false to use 'data.prompt-template'"
            )
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
        return str(prompt), response
    return cfg.prompt_template.format(instruction=instruction), response


def encode_example(prompt: str, response: str, tokenizer: Any, max_len: int) -> Example | None:
    """Token ids of ``BOS prompt response EOS``, truncated, with the prompt masked.

    Prompt and response are encoded separately and concatenated, so the boundary between
    them (where the loss starts) is exact whatever the tokenizer merges across it.

    Returns
    -------
    Example | None
        ``labels`` equal ``input_ids`` on the response and its EOS, and
        :data:`IGNORE_INDEX` on the prompt; None if truncation to ``max_len`` leaves no
        response token.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token
    # Chat templates often write BOS themselves; a second one would be off-distribution.
    if tokenizer.bos_token_id is not None and not (bos and prompt.startswith(bos)):
        prompt_ids.insert(0, tokenizer.bos_token_id)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        # The model must learn to stop; EOS is what generation stops on.
        response_ids.append(tokenizer.eos_token_id)
    input_ids = (prompt_ids + response_ids)[:max_len]
    if len(input_ids) <= len(prompt_ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids[: max_len - len(prompt_ids)]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    """Padding id: the tokenizer's pad token, else EOS (causal LMs often lack a pad)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    return int(pad)


def tokenize_dataset(
    dataset: Iterable[Mapping[str, Any]], tokenizer: Any, cfg: DataConfig
) -> TokenizedExamples:
    """Encode every record with the loss on response tokens only.

    Parameters
    ----------
    dataset : Iterable[Mapping[str, Any]]
        Records with the configured instruction and response columns.
    tokenizer : Any
        A Hugging Face tokenizer.
    cfg : DataConfig
        Prompt format and ``data.max-seq-length``.

    Returns
    -------
    TokenizedExamples
        The examples in record order; ``num_dropped`` counts records left out because
        truncation left no response token or the instruction or response was missing.
    """
    examples: list[Example] = []
    dropped = 0
    for record in dataset:
        if record[cfg.instruction_column] is None or record[cfg.response_column] is None:
            # Empty cells of a CSV: str(None) would teach the model to answer "None".
            dropped += 1
            continue
        prompt, response = format_prompt(record, cfg, tokenizer)
        encoded = encode_example(prompt, response, tokenizer, cfg.max_seq_length)
        if encoded is None:
            dropped += 1
        else:
            examples.append(encoded)
    return TokenizedExamples(examples, num_dropped=dropped, pad_id=pad_token_id(tokenizer))


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


class Collator:
    """Right-pads a list of examples to the longest; pads never count in the loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Stack ``batch`` into (B, T) tensors, T the longest example of the batch."""
        width = max(len(ex["input_ids"]) for ex in batch)

        def padded(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([ex[key] + [fill] * (width - len(ex[key])) for ex in batch])

        return {
            "input_ids": padded("input_ids", self.pad_id),
            "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX),
        }


def make_dataloader(
    tokenized: Sequence[Example],
    batch_size: int,
    shuffle: bool,
    seed: int,
    pad_id: int | None = None,
) -> DataLoader[Any]:
    """Right-padded batches of ``tokenized``.

    Parameters
    ----------
    tokenized : Sequence[Example]
        Output of :func:`tokenize_dataset`.
    batch_size : int
        Examples per batch (the last batch may be smaller).
    shuffle : bool
        Reshuffle on every pass over the data.
    seed : int
        The order of a fresh loader depends only on this seed.
    pad_id : int | None
        Padding id; default: the one :func:`tokenize_dataset` recorded.

    Returns
    -------
    DataLoader
        Batches of ``input_ids``, ``attention_mask`` and ``labels``, each (B, T).
    """
    if not tokenized:
        raise ValueError("no examples to batch")
    if pad_id is None:
        pad_id = getattr(tokenized, "pad_id", None)
        if pad_id is None:
            raise ValueError("pass pad_id: the examples do not come from tokenize_dataset")
    # A loader-local generator: the global torch RNG (model init, dropout) stays untouched.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        tokenized,  # type: ignore[arg-type]  # a list of dicts is a map-style dataset
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=Collator(pad_id),
    )


def count_response_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens of ``batch`` that count in the loss (labels other than -100)."""
    return int((batch["labels"] != IGNORE_INDEX).sum().item())


# --------------------------------------------------------------------------------------
# One site, end to end
# --------------------------------------------------------------------------------------


def prepare_client_data(
    cfg: DataConfig,
    tokenizer: Any,
    partition_id: int,
    num_partitions: int,
    seed: int,
    data_path: str | None = None,
) -> ClientData:
    """Load, partition (unless the site has its own file), split and tokenize.

    Parameters
    ----------
    cfg : DataConfig
        The ``data.*`` settings.
    tokenizer : Any
        The base model's tokenizer.
    partition_id, num_partitions : int
        This simulated site and how many there are; ignored with ``data_path``.
    seed : int
        Seed of the partitions and of the held-out split.
    data_path : str | None
        A real site's own file (node-config ``data-path``), used whole.

    Returns
    -------
    ClientData
        Tokenized train and held-out examples of this site.
    """
    records = load_records(cfg, data_path)
    if data_path is None:
        records = partition(records, cfg, partition_id, num_partitions, seed)
    train, held_out = train_eval_split(records, cfg.eval_fraction, seed)
    train_examples = tokenize_dataset(train, tokenizer, cfg)
    eval_examples = tokenize_dataset(held_out, tokenizer, cfg)
    if not train_examples or not eval_examples:
        raise ValueError(
            f"no {'training' if not train_examples else 'held-out'} example keeps a response "
            f"token after truncation to run-config 'data.max-seq-length' = "
            f"{cfg.max_seq_length} (of {len(records)} records)"
        )
    return ClientData(
        train_examples, eval_examples, train_examples.num_dropped + eval_examples.num_dropped
    )
