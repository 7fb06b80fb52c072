"""The offline default: a generated instruction dataset and a tiny Llama built from code.

Nothing here downloads anything. The model and tokenizer are written in Hugging Face
format and loaded back through ``from_pretrained``, the same path a hub id takes, so the
default run exercises the real loading code (including 4-bit quantization).

The dataset stands in for the product's three kinds of sites: a hospital (patient
questions), a bank (customer questions) and a smart-home maker (device commands). Each
answer is a deterministic function of its question, so a small model can learn it, and
the domains share almost no vocabulary, so a site that trains alone learns little about
the others' data.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

EMBEDDED_VERSION = "v1"
DOMAINS = ("medical", "finance", "smart-home")

# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------

_SYMPTOMS = {
    "headache": ("paracetamol", 500),
    "fever": ("ibuprofen", 400),
    "cough": ("dextromethorphan", 30),
    "allergy": ("cetirizine", 10),
    "heartburn": ("omeprazole", 20),
    "nausea": ("ondansetron", 4),
    "back pain": ("naproxen", 250),
    "insomnia": ("melatonin", 3),
}
_ACCOUNTS = {"savings": 3, "checking": 1, "deposit": 5, "pension": 4, "student": 2}
_DEVICES = ("lights", "heater", "fan", "blinds", "speaker", "oven", "lamp", "camera")
_ROOMS = ("kitchen", "bedroom", "garage", "hallway", "office", "bathroom", "garden")
_STATES = ("on", "off")


def _medical(rng: random.Random) -> tuple[str, str]:
    symptom = rng.choice(sorted(_SYMPTOMS))
    drug, dose = _SYMPTOMS[symptom]
    days = rng.randint(1, 9)
    if rng.random() < 0.5:
        question = f"I have had {symptom} for {days} days. What medicine should I take?"
        answer = (
            f"For {symptom} the usual medicine is {drug} {dose} mg. "
            f"After {days} days you should see your doctor."
        )
    else:
        question = f"What is the usual dose of {drug} for {symptom}?"
        answer = f"The usual dose of {drug} for {symptom} is {dose} mg, taken with water."
    return question, answer


def _finance(rng: random.Random) -> tuple[str, str]:
    account = rng.choice(sorted(_ACCOUNTS))
    rate = _ACCOUNTS[account]
    amount = rng.choice((100, 200, 500, 1000, 2000, 5000))
    if rng.random() < 0.5:
        question = f"How much interest does my {account} account pay on {amount} dollars?"
        answer = (
            f"Your {account} account pays {rate} percent per year, "
            f"so {amount} dollars earn {amount * rate // 100} dollars."
        )
    else:
        question = f"Can I transfer {amount} dollars from my {account} account today?"
        answer = (
            f"Yes, a transfer of {amount} dollars from your {account} account "
            f"is processed today and costs no fee."
        )
    return question, answer


def _smart_home(rng: random.Random) -> tuple[str, str]:
    device, room, state = rng.choice(_DEVICES), rng.choice(_ROOMS), rng.choice(_STATES)
    hour = rng.randint(1, 12)
    if rng.random() < 0.5:
        question = f"Turn {state} the {device} in the {room} at {hour} o'clock."
        answer = f"Okay, the {device} in the {room} will switch {state} at {hour} o'clock."
    else:
        question = f"Is the {device} in the {room} {state}?"
        answer = f"Checking the {room}: the {device} is now {state}, as you asked."
    return question, answer


_GENERATORS = {"medical": _medical, "finance": _finance, "smart-home": _smart_home}


def generate_instruction_dataset(num_per_domain: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic instruction/response rows with a ``domain`` column.

    Parameters
    ----------
    num_per_domain : int
        Rows generated for each of ``DOMAINS``.
    seed : int
        Same seed, same rows, on every machine.
    """
    rows = []
    for index, domain in enumerate(DOMAINS):
        rng = random.Random(seed * 1000 + index)
        for _ in range(num_per_domain):
            question, answer = _GENERATORS[domain](rng)
            rows.append({"instruction": question, "response": answer, "domain": domain})
    return rows


# --------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>")

# A minimal chat template: the ClientApp's `data.use-chat-template` works on the default.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|> {{ message['content'] }} "
    "{% else %}<|assistant|> {{ message['content'] }}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _build_tokenizer(corpus: list[str]) -> Any:
    """A word-level tokenizer whose vocabulary is the sorted words of ``corpus``.

    Sorting makes the vocabulary, and so the saved files, identical on every build;
    digits are split one by one so any number is representable.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    words: set[str] = set(str(d) for d in range(10))
    for text in corpus:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {token: i for i, token in enumerate(itertools.chain(SPECIAL_TOKENS, sorted(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny Llama and its tokenizer, deterministically, into ``out_dir``.

    Every linear dimension is a multiple of 64, which bitsandbytes' 4-bit blocks need.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flower_llm.config import DataConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate_instruction_dataset()
    template = DataConfig().prompt_template
    corpus = [template.format(instruction=r["instruction"]) + r["response"] for r in rows]
    tokenizer = _build_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def default_cache_root() -> Path:
    """``$FLOWER_LLM_CACHE`` or ``~/.cache/flower-llm``."""
    return Path(os.environ.get("FLOWER_LLM_CACHE", Path.home() / ".cache" / "flower-llm"))


def embedded_model_dir(cache_root: str | Path | None = None) -> Path:
    """The cached tiny model directory, built on first use.

    Safe when several client processes start at once: each builds into its own temporary
    directory and renames it into place; whoever loses the race discards its copy.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / f"embedded-tiny-llama-{EMBEDDED_VERSION}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        build_tiny_model(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def directory_digest(path: str | Path) -> str:
    """sha256 over the names and bytes of every file in ``path`` (for determinism checks)."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            digest.update(file.relative_to(path).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()
