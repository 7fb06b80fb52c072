"""The embedded default: generated 3-domain data, the tiny Llama, its tokenizer and cache."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flower_llm import embedded
from flower_llm.config import DataConfig
from flower_llm.embedded import (
    DOMAINS,
    build_tiny_model,
    embedded_model_dir,
    generate_instruction_dataset,
)
from flower_llm.tasks import bundled_task_file, load_task, score_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_depends_on_the_seed() -> None:
    # Execute
    first = generate_instruction_dataset(num_per_domain=50, seed=7)
    again = generate_instruction_dataset(num_per_domain=50, seed=7)
    other = generate_instruction_dataset(num_per_domain=50, seed=8)

    # Assert
    assert first == again
    assert first != other
    assert len(first) == 150
    assert all(set(row) == {"instruction", "response", "domain"} for row in first)
    assert [row["domain"] for row in first] == [d for d in DOMAINS for _ in range(50)]


def test_each_answer_is_a_function_of_its_question() -> None:
    # Prepare
    rows = generate_instruction_dataset()
    answers: dict[str, set[str]] = {}

    # Execute
    for row in rows:
        answers.setdefault(row["instruction"], set()).add(row["response"])

    # Assert: one question never gets two answers, so the mapping is learnable
    assert all(len(a) == 1 for a in answers.values())
    # ...and there is more than a handful of distinct questions per domain to learn from
    for domain in DOMAINS:
        distinct = {r["instruction"] for r in rows if r["domain"] == domain}
        assert len(distinct) >= 150, domain


def test_answers_copy_the_slots_of_their_questions() -> None:
    # Prepare
    rows = generate_instruction_dataset(num_per_domain=100)

    # Execute: the numbers a question states (days, ages, amounts, hours, degrees)
    missing = [
        row
        for row in rows
        if not set(re.findall(r"\d+", row["instruction"]))
        <= set(re.findall(r"\d+", row["response"]))
    ]

    # Assert
    assert missing == []


def test_domains_use_clearly_different_vocabulary() -> None:
    # Prepare
    rows = generate_instruction_dataset()
    vocab = {
        d: set().union(
            *(words(r["instruction"] + " " + r["response"]) for r in rows if r["domain"] == d)
        )
        for d in DOMAINS
    }

    # Execute
    overlaps = {
        (a, b): len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
        for a, b in itertools.combinations(DOMAINS, 2)
    }

    # Assert: only function words are shared
    assert all(share < 0.15 for share in overlaps.values()), overlaps
    assert {"medicine", "dose"} <= vocab["medical"] - vocab["finance"] - vocab["smart-home"]
    assert {"account", "interest"} <= vocab["finance"] - vocab["medical"] - vocab["smart-home"]
    assert {"thermostat", "degrees", "kitchen"} <= vocab["smart-home"] - vocab["finance"]


def test_examples_are_short_and_fit_in_the_default_max_seq_length(tiny_model_dir: Path) -> None:
    # Prepare
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = DataConfig().prompt_template
    rows = generate_instruction_dataset()

    # Execute
    lengths = [
        len(tokenizer(template.format(instruction=r["instruction"]) + r["response"])["input_ids"])
        for r in rows
    ]

    # Assert
    assert max(len(r["response"].split()) for r in rows) <= 25
    assert max(lengths) + 1 <= DataConfig().max_seq_length  # + EOS


# --------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------


def test_build_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    # Prepare
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()

    # Execute
    first = file_hashes(build_tiny_model(tmp_path / "a"))
    second = file_hashes(build_tiny_model(tmp_path / "b"))
    other_seed = file_hashes(build_tiny_model(tmp_path / "c", seed=1))

    # Assert
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(first)
    assert first == second
    assert other_seed["model.safetensors"] != first["model.safetensors"]
    assert other_seed["tokenizer.json"] == first["tokenizer.json"]
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG must not move"


def test_build_is_identical_in_another_process_with_another_hash_seed(tmp_path: Path) -> None:
    """Sites build their own copy; FedAvg of adapters needs the same base everywhere."""
    # Prepare
    script = "import sys; from flower_llm import embedded; embedded.build_tiny_model(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}

    # Execute
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "other")],
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        timeout=300,
    )
    here = build_tiny_model(tmp_path / "here")

    # Assert
    assert file_hashes(tmp_path / "other") == file_hashes(here)


def test_build_is_deterministic_across_threads(tmp_path: Path) -> None:
    # Prepare: threads share the global torch RNG, the build must not depend on it
    dirs = [tmp_path / str(i) for i in range(3)]
    threads = [threading.Thread(target=build_tiny_model, args=(d,)) for d in dirs]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    hashes = [file_hashes(d) for d in dirs]
    assert hashes[0] and hashes[0] == hashes[1] == hashes[2]


def test_tiny_model_loads_through_the_auto_classes(tiny_model_dir: Path) -> None:
    # Execute
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    # Assert
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert cfg.vocab_size == len(tokenizer)
    assert not cfg.tie_word_embeddings
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(
        m.in_features % 64 == 0 and m.out_features % 64 == 0
        for m in linears
        if m is not model.lm_head
    )
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    logits = model(**tokenizer("Is the fan in the office on?", return_tensors="pt")).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_tokenizer_is_a_byte_level_bpe_with_special_tokens_and_chat_template(
    tiny_model_dir: Path,
) -> None:
    # Prepare
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    unseen = "Zürich café: 12345 émojis 🙂 never seen in training"

    # Execute
    ids = tokenizer(unseen)["input_ids"]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the fan on?"}], tokenize=False, add_generation_prompt=True
    )

    # Assert
    assert 500 <= len(tokenizer) <= 2048
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == unseen
    # Domain words are single tokens: BPE learned them from the embedded corpus
    assert len(tokenizer(" paracetamol", add_special_tokens=False)["input_ids"]) == 1
    assert chat == "<|user|> Is the fan on?\n<|assistant|>\n"


def test_tiny_model_loads_in_4bit_with_bitsandbytes(tiny_model_dir: Path) -> None:
    # Prepare
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )

    # Execute
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quant, device_map="cpu"
    )

    # Assert: every Linear of the decoder layers is 4-bit, the output head is not
    decoder_linears = {
        name: module
        for name, module in model.named_modules()
        if ".layers." in name and isinstance(module, torch.nn.Linear)
    }
    assert len(decoder_linears) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in decoder_linears.values())
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 40, 41, 42]])).logits
    assert torch.isfinite(logits.float()).all()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run tiny-tensor training on one intra-op thread, then restore the setting.

    On a busy 2-core machine, every op of a 2-thread OpenMP pool waits for a descheduled
    thread: the same 40 steps took 1 s or 40 s depending on the load.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_lora_on_one_domain_learns_it_and_not_the_others(tiny_model_dir: Path) -> None:
    """The product story in miniature: a site that trains alone is poor on the others."""
    # Prepare
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    template = DataConfig().prompt_template
    rows = generate_instruction_dataset(num_per_domain=160, seed=3)
    evaluation = generate_instruction_dataset(num_per_domain=20, seed=99)

    def batch(examples: list[dict[str, str]], width: int = 64) -> dict[str, torch.Tensor]:
        # Loss on the response only (the data module's own tests cover its encoder). One
        # fixed width: CPU kernels are re-planned for every new shape, which costs more
        # than the padding.
        ids, labels = [], []
        for r in examples:
            prompt = tokenizer(template.format(instruction=r["instruction"]))["input_ids"]
            answer = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
            answer.append(tokenizer.eos_token_id)
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        }

    def losses() -> dict[str, float]:
        with torch.no_grad():
            return {d: float(model(**held_out[d]).loss) for d in DOMAINS}

    def accuracy(domain: str) -> float:
        # The bundled multiple-choice task of the domain (flower_llm.tasks), chance 1/4
        task = load_task(bundled_task_file(domain))
        return score_task(model, tokenizer, task, DataConfig(), batch_size=60).accuracy

    held_out = {d: batch([r for r in evaluation if r["domain"] == d]) for d in DOMAINS}
    medical = batch([r for r in rows if r["domain"] == "medical"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    before = losses()
    accuracy_before = accuracy("medical")

    # Execute: 40 steps of 8 medical examples
    model.train()
    for step in range(40):
        rows_of_step = slice(step * 8 % 160, step * 8 % 160 + 8)
        model(**{k: v[rows_of_step] for k, v in medical.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = losses()
    accuracy_after = {d: accuracy(d) for d in DOMAINS}

    # Assert
    assert after["medical"] < before["medical"] - 3.0, (before, after)
    assert after["finance"] > after["medical"] + 3.0, after
    assert after["smart-home"] > after["medical"] + 3.0, after
    # ... and answers its multiple-choice questions (measured: 0.17 -> 0.67; the others'
    # stay near chance, 0.27 and 0.17)
    assert accuracy_after["medical"] >= max(0.5, accuracy_before + 0.3), accuracy_after
    assert accuracy_after["finance"] < accuracy_after["medical"] - 0.2, accuracy_after
    assert accuracy_after["smart-home"] < accuracy_after["medical"] - 0.2, accuracy_after


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def test_model_dir_is_built_once_then_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("FLOWER_LLM_CACHE", str(tmp_path / "cache"))

    # Execute
    first = embedded_model_dir()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = embedded_model_dir()

    # Assert
    assert first == tmp_path / "cache" / f"embedded-tiny-llama-{embedded.EMBEDDED_VERSION}"
    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]


def test_concurrent_first_use_yields_one_complete_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: hold every builder until all have built, so all of them race to rename
    callers = 3
    barrier = threading.Barrier(callers, timeout=60)
    real_build = embedded.build_tiny_model

    def build_then_wait(out_dir: str | Path, seed: int = 0) -> Path:
        out = real_build(out_dir, seed)
        barrier.wait()
        return out

    monkeypatch.setattr(embedded, "build_tiny_model", build_then_wait)
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(embedded_model_dir(tmp_path))
        except BaseException as err:  # surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(callers)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert: all got the same, complete directory and no staging copy is left behind
    assert errors == []
    assert len(results) == callers and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
    assert file_hashes(results[0]) == file_hashes(real_build(tmp_path / "reference"))
