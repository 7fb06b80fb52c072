"""The offline default: a generated instruction dataset and a tiny Llama built from code.

Nothing here downloads anything. The model and tokenizer are written in Hugging Face
format and loaded back through ``from_pretrained``, the same path a hub id takes, so the
default run exercises the real loading code (including 4-bit quantization).

The dataset stands in for the product's three kinds of sites: a hospital (patient
questions), a bank (customer questions) and a smart-home maker (device commands). Each
answer is a deterministic function of its question: it copies slots of the question
(days, ages, rooms, amounts) and looks others up in small fixed tables (a symptom's
medicine and dose, an account's interest rate), so a small model can learn it in a few
dozen steps. The domains share almost no vocabulary, so a site that trains alone learns
little about the others' data.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EMBEDDED_VERSION = "v2"
"""Bump whenever the build recipe changes: it names the cache directory, so a stale
build from an older recipe is never picked up."""

DOMAINS = ("medical", "finance", "smart-home")

# --------------------------------------------------------------------------------------
# Dataset: slot tables
# --------------------------------------------------------------------------------------

# symptom -> (medicine, dose in mg, hours between doses)
_MEDICINES: dict[str, tuple[str, int, int]] = {
    "headache": ("paracetamol", 500, 6),
    "fever": ("ibuprofen", 400, 8),
    "cough": ("dextromethorphan", 30, 6),
    "allergy": ("cetirizine", 10, 24),
    "heartburn": ("omeprazole", 20, 24),
    "nausea": ("ondansetron", 4, 8),
    "back pain": ("naproxen", 250, 12),
    "insomnia": ("melatonin", 3, 24),
    "migraine": ("sumatriptan", 50, 12),
    "sore throat": ("benzocaine", 8, 4),
}
_RELATIVES = ("mother", "father", "son", "daughter", "wife", "husband", "sister", "brother")

# account -> (interest in percent per year, monthly fee in dollars)
_ACCOUNTS: dict[str, tuple[int, int]] = {
    "savings": (3, 2),
    "checking": (1, 4),
    "deposit": (5, 1),
    "pension": (4, 3),
    "student": (2, 1),
    "business": (2, 9),
    "joint": (1, 3),
}
_AMOUNTS = (100, 200, 300, 400, 500, 1000, 2000, 3000, 4000, 5000)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

_DEVICES = (
    "lights",
    "heater",
    "fan",
    "blinds",
    "speaker",
    "oven",
    "lamp",
    "camera",
    "kettle",
    "dishwasher",
)
_ROOMS = ("kitchen", "bedroom", "garage", "hallway", "office", "bathroom", "garden")
_STATES = ("on", "off")

# --------------------------------------------------------------------------------------
# Dataset: one generator per domain, three question templates each
# --------------------------------------------------------------------------------------


def _medical(rng: random.Random) -> tuple[str, str]:
    symptom = rng.choice(sorted(_MEDICINES))
    drug, dose, hours = _MEDICINES[symptom]
    template = rng.randrange(3)
    if template == 0:
        days = rng.randint(2, 9)
        return (
            f"I have had {symptom} for {days} days. What medicine should I take?",
            f"For {symptom} the usual medicine is {drug} {dose} mg. "
            f"After {days} days you should see your doctor.",
        )
    if template == 1:
        age = rng.randint(18, 80)
        return (
            f"I am {age} years old. What is the usual dose of {drug} for {symptom}?",
            f"At {age} the usual dose of {drug} for {symptom} is {dose} mg, taken with water.",
        )
    relative = rng.choice(_RELATIVES)
    return (
        f"How often can my {relative} take {drug} for {symptom}?",
        f"Your {relative} can take {drug} every {hours} hours for {symptom}.",
    )


def _finance(rng: random.Random) -> tuple[str, str]:
    account = rng.choice(sorted(_ACCOUNTS))
    rate, fee = _ACCOUNTS[account]
    template = rng.randrange(3)
    if template == 0:
        amount = rng.choice(_AMOUNTS)
        return (
            f"How much interest does my {account} account pay on {amount} dollars?",
            f"Your {account} account pays {rate} percent per year, "
            f"so {amount} dollars earn {amount * rate // 100} dollars.",
        )
    if template == 1:
        amount, weekday = rng.choice(_AMOUNTS), rng.choice(_WEEKDAYS)
        return (
            f"Can I transfer {amount} dollars from my {account} account on {weekday}?",
            f"Yes, a transfer of {amount} dollars from your {account} account "
            f"is processed on {weekday} with no fee.",
        )
    month = rng.choice(_MONTHS)
    return (
        f"What has my {account} account cost per month since {month}?",
        f"Since {month} your {account} account costs {fee} dollars per month.",
    )


def _smart_home(rng: random.Random) -> tuple[str, str]:
    device, room, state = rng.choice(_DEVICES), rng.choice(_ROOMS), rng.choice(_STATES)
    template = rng.randrange(3)
    if template == 0:
        hour = rng.randint(1, 12)
        return (
            f"Turn {state} the {device} in the {room} at {hour} o'clock.",
            f"Okay, the {device} in the {room} will switch {state} at {hour} o'clock.",
        )
    if template == 1:
        return (
            f"Is the {device} in the {room} {state}?",
            f"Right now the {device} in the {room} is {state}, as you asked.",
        )
    degrees = rng.randint(16, 26)
    return (
        f"Set the thermostat in the {room} to {degrees} degrees.",
        f"Done, the {room} thermostat is now set to {degrees} degrees.",
    )


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "medical": _medical,
    "finance": _finance,
    "smart-home": _smart_home,
}


def generate_instruction_dataset(num_per_domain: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic instruction/response rows of the three product domains.

    Parameters
    ----------
    num_per_domain : int
        Rows generated for each of ``DOMAINS`` (medical, finance, smart-home), in that
        order: the rows come grouped by domain.
    seed : int
        Same seed, same rows, on every machine and in every process.

    Returns
    -------
    list[dict[str, str]]
        Rows with keys ``instruction``, ``response`` and ``domain``.
    """
    if num_per_domain < 0:
        raise ValueError(f"num_per_domain must be >= 0, got {num_per_domain}")
    rows = []
    for index, domain in enumerate(DOMAINS):
        # One stream per domain, so the rows of a domain do not depend on the others.
        rng = random.Random(seed * 1000 + index)
        for _ in range(num_per_domain):
            question, answer = _GENERATORS[domain](rng)
            rows.append({"instruction": question, "response": answer, "domain": domain})
    return rows


# --------------------------------------------------------------------------------------
# Multiple-choice tasks: the same facts, asked as questions with four options
# --------------------------------------------------------------------------------------


def _other(rng: random.Random, pool: Sequence[Any], right: Any) -> Any:
    return rng.choice([v for v in pool if v != right])


def _mc(
    question: str, right: str, wrong_fact: str, other_answers: list[str], rng: random.Random
) -> dict[str, Any]:
    """Four options: the answer, the answer with a wrong fact, the answers of the
    domain's two other templates (right facts, but to another question)."""
    options = [right, wrong_fact, *other_answers]
    rng.shuffle(options)
    return {"question": question, "options": options, "answer": "ABCD"[options.index(right)]}


def _medical_mc(rng: random.Random, template: int) -> dict[str, Any]:
    symptom = rng.choice(sorted(_MEDICINES))
    drug, dose, hours = _MEDICINES[symptom]
    days, age, relative = rng.randint(2, 9), rng.randint(18, 80), rng.choice(_RELATIVES)
    wrong = _MEDICINES[_other(rng, sorted(_MEDICINES), symptom)]
    questions = (
        f"I have had {symptom} for {days} days. What medicine should I take?",
        f"I am {age} years old. What is the usual dose of {drug} for {symptom}?",
        f"How often can my {relative} take {drug} for {symptom}?",
    )

    def answers(medicine: str, mg: int, every: int) -> list[str]:
        return [
            f"For {symptom} the usual medicine is {medicine} {mg} mg. "
            f"After {days} days you should see your doctor.",
            f"At {age} the usual dose of {drug} for {symptom} is {mg} mg, taken with water.",
            f"Your {relative} can take {drug} every {every} hours for {symptom}.",
        ]

    right = answers(drug, dose, hours)
    wrong_every = _other(rng, sorted({v[2] for v in _MEDICINES.values()}), hours)
    wrong_dose = _other(rng, sorted({v[1] for v in _MEDICINES.values()}), dose)
    wrong_facts = (
        answers(wrong[0], wrong[1], hours)[0],
        answers(drug, wrong_dose, hours)[1],
        answers(drug, dose, wrong_every)[2],
    )
    others = [a for i, a in enumerate(right) if i != template]
    return _mc(questions[template], right[template], wrong_facts[template], others, rng)


def _finance_mc(rng: random.Random, template: int) -> dict[str, Any]:
    account = rng.choice(sorted(_ACCOUNTS))
    rate, fee = _ACCOUNTS[account]
    amount, weekday, month = rng.choice(_AMOUNTS), rng.choice(_WEEKDAYS), rng.choice(_MONTHS)
    questions = (
        f"How much interest does my {account} account pay on {amount} dollars?",
        f"Can I transfer {amount} dollars from my {account} account on {weekday}?",
        f"What has my {account} account cost per month since {month}?",
    )

    def answers(percent: int, sent: int, monthly: int) -> list[str]:
        return [
            f"Your {account} account pays {percent} percent per year, "
            f"so {amount} dollars earn {amount * percent // 100} dollars.",
            f"Yes, a transfer of {sent} dollars from your {account} account "
            f"is processed on {weekday} with no fee.",
            f"Since {month} your {account} account costs {monthly} dollars per month.",
        ]

    right = answers(rate, amount, fee)
    wrong = answers(
        _other(rng, sorted({v[0] for v in _ACCOUNTS.values()}), rate),
        _other(rng, _AMOUNTS, amount),
        _other(rng, sorted({v[1] for v in _ACCOUNTS.values()}), fee),
    )
    others = [a for i, a in enumerate(right) if i != template]
    return _mc(questions[template], right[template], wrong[template], others, rng)


def _smart_home_mc(rng: random.Random, template: int) -> dict[str, Any]:
    device, room, state = rng.choice(_DEVICES), rng.choice(_ROOMS), rng.choice(_STATES)
    hour, degrees = rng.randint(1, 12), rng.randint(16, 26)
    questions = (
        f"Turn {state} the {device} in the {room} at {hour} o'clock.",
        f"Is the {device} in the {room} {state}?",
        f"Set the thermostat in the {room} to {degrees} degrees.",
    )

    def answers(at: int, where: str, set_to: int) -> list[str]:
        return [
            f"Okay, the {device} in the {room} will switch {state} at {at} o'clock.",
            f"Right now the {device} in the {where} is {state}, as you asked.",
            f"Done, the {room} thermostat is now set to {set_to} degrees.",
        ]

    right = answers(hour, room, degrees)
    wrong = answers(
        _other(rng, range(1, 13), hour),
        _other(rng, _ROOMS, room),
        _other(rng, range(16, 27), degrees),
    )
    others = [a for i, a in enumerate(right) if i != template]
    return _mc(questions[template], right[template], wrong[template], others, rng)


_MC_GENERATORS: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "medical": _medical_mc,
    "finance": _finance_mc,
    "smart-home": _smart_home_mc,
}


def generate_domain_task(
    domain: str, num_questions: int = 30, seed: int = 7
) -> list[dict[str, Any]]:
    """Multiple-choice questions on the facts of one domain's training data.

    Each question is one of the domain's three instruction templates with fresh slot
    values, never an instruction of the embedded training data
    (:func:`generate_instruction_dataset`, ``seed=0``); the four options are that
    template's response; the same response with one wrong fact (another symptom's
    medicine, another dose, interval, rate, fee, amount, hour, room or temperature); and
    the responses of the domain's two other templates on the same subject, which answer
    another question. Shuffled. A model that learnt which response answers which question
    rules out two options; one that learnt the fact tables (or to copy a slot from the
    question) rules out the third, which is what the sites train on. Templates take turns,
    so each is a third of the questions; chance is 1/4.

    Returns
    -------
    list[dict]
        Task-file records: ``question``, ``options`` (4 strings), ``answer`` (a letter).
    """
    if domain not in _MC_GENERATORS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    trained = {row["instruction"] for row in generate_instruction_dataset()}
    rng = random.Random(seed * 1000 + DOMAINS.index(domain))
    records: list[dict[str, Any]] = []
    asked: set[str] = set()
    for _attempt in range(100 * num_questions):
        if len(records) == num_questions:
            break
        record = _MC_GENERATORS[domain](rng, len(records) % 3)
        if record["question"] in trained or record["question"] in asked:
            continue
        asked.add(record["question"])
        records.append(record)
    else:
        raise ValueError(
            f"found only {len(records)} fresh {domain} questions after {100 * num_questions} tries"
        )
    return records


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

PAD, UNK, BOS, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, USER, ASSISTANT)  # ids 0..5, in this order

TOKENIZER_VOCAB_SIZE = 1024
"""Upper bound for BPE training; the embedded corpus saturates a little below it."""

# GPT-2's split rule, except that numbers split into single digits (as Llama does), so
# every amount is spelled with the same ten tokens; the space stays with the first digit.
_SPLIT_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# The prompt format the tokenizer is trained on. Deliberately a copy of the default
# `data.prompt-template`, not an import of it: changing a run default must not change
# the bytes of a model built under the same EMBEDDED_VERSION.
_CORPUS_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{response}"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}</s>\n"
    "{% else %}<|user|> {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Minimal chat format, so ``data.use-chat-template`` works on the embedded model.
System messages are rendered like user turns: the tiny model has no system role."""


def _tokenizer_corpus() -> list[str]:
    rows = generate_instruction_dataset(num_per_domain=300, seed=0)
    return [_CORPUS_TEMPLATE.format(**row) for row in rows]


def build_tokenizer() -> Any:
    """A byte-level BPE trained on the embedded dataset, as a ``PreTrainedTokenizerFast``.

    Byte-level means any text encodes without ``<unk>`` (a site's own file works with the
    embedded model too, if badly). Every site builds its own copy, so the files must be
    identical everywhere: BPE training gave the same merges in every process and under
    every hash seed tried (tokenizers 0.23), and the tests compare file hashes of builds
    in this process and in a subprocess with another ``PYTHONHASHSEED``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # Like Llama's tokenizers: `tokenizer(text)` starts with BOS. The data pipeline
    # encodes with add_special_tokens=False and adds BOS itself.
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

# Every Linear dimension is a multiple of 64, which bitsandbytes' 4-bit blocks need.
MODEL_DIMS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.02,
}


def _init_weights(model: Any, seed: int) -> None:
    """Overwrite every weight from a private generator seeded with ``seed``.

    Owning the initialisation keeps the bytes independent of transformers' init code
    (which changes between releases) and of the global RNG (which threads share).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # RMSNorm gains; Llama has no biases
                param.fill_(1.0)
            elif name == "lm_head.weight":
                # The base stays random and LoRA does not adapt lm_head, so its scale caps
                # how confident the model can get: at Llama's std 0.02 the logits span
                # about +-2.5 after the final RMSNorm and the loss cannot fall below ~4
                # nats. Unit-variance logits (std 1/sqrt(hidden), as in a trained model)
                # let 40 LoRA steps on one domain take its loss from ~7 to ~1.3 (see
                # tests/test_embedded.py::test_lora_on_one_domain_learns_it_and_not_the_others).
                param.normal_(0.0, hidden**-0.5, generator=generator)
            else:
                param.normal_(0.0, model.config.initializer_range, generator=generator)
        pad = model.config.pad_token_id
        if pad is not None:
            model.get_input_embeddings().weight[pad].zero_()


def llama_config(tokenizer: Any, dims: dict[str, Any]) -> Any:
    """A Llama ``LlamaConfig`` of size ``dims`` around ``tokenizer``'s vocabulary and tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny Llama and its tokenizer, deterministically, into ``out_dir``.

    Parameters
    ----------
    out_dir : str | Path
        Directory to write ``config.json``, ``model.safetensors`` and the tokenizer
        files into (created if missing).
    seed : int
        Seed of the weight initialisation; the global torch RNG is left untouched.

    Returns
    -------
    Path
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = llama_config(tokenizer, MODEL_DIMS)
    # Construction draws from the global RNG; fork_rng hands the caller's stream back.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    _init_weights(model, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$FLOWER_LLM_CACHE`` or ``~/.cache/flower-llm``."""
    configured = os.environ.get("FLOWER_LLM_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "flower-llm"


def embedded_model_dir(cache_root: str | Path | None = None) -> Path:
    """The cached tiny model directory, built on first use.

    Parameters
    ----------
    cache_root : str | Path | None
        Where to cache; default :func:`default_cache_root`.

    Returns
    -------
    Path
        ``<cache_root>/embedded-tiny-llama-<EMBEDDED_VERSION>``.

    Notes
    -----
    Safe when several client processes start at once: each builds into its own
    temporary directory next to the target and renames it into place, which is atomic
    on one filesystem. The loser of the race finds the target taken and discards its
    copy, so a reader never sees a half-written model.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / f"embedded-tiny-llama-{EMBEDDED_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-building-", dir=root))
    try:
        build_tiny_model(staging)
        try:
            # rename(2) refuses to replace a non-empty directory: exactly the check we
            # want, without a window between "exists?" and "rename".
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def directory_digest(path: str | Path) -> str:
    """sha256 over the names and bytes of every file in ``path`` (for determinism checks)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*")):
        if file.is_file():
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(b"\0")
            digest.update(file.read_bytes())
    return digest.hexdigest()
