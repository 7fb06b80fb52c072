"""Run reports and the `flower-llm` command, end to end on a real run directory.

The run directory is made by hand with the library, as the server makes it: a tiny Llama
built from code, a LoRA adapter trained for a few steps on the embedded data (so it is
far from its zero-initialised start), per-round adapters, metrics and a summary.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flower_llm.adapters import adapter_state, apply_lora, init_adapter, load_adapter_state
from flower_llm.cli import exact_match, main
from flower_llm.config import parse_run_config
from flower_llm.data import load_records, make_dataloader, tokenize_dataset, train_eval_split
from flower_llm.models import load_base_model
from flower_llm.outputs import FINAL_ADAPTER, METRICS_FILE, RunDirectory, round_name
from flower_llm.plan import (
    GIB,
    AdaptedLinear,
    ModelShape,
    PlanSettings,
    attention_score_bytes,
    estimate_memory,
    format_bytes,
    layer_activation_bytes,
    load_model_config,
    parse_memory,
)
from flower_llm.report import plot_rounds, read_run, write_report
from flower_llm.train import cycle_batches, evaluate, train_adapter

CPU = torch.device("cpu")
ROUNDS = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

LLAMA_3_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-round run directory with a trained adapter and DP-style epsilon."""
    cfg = parse_run_config(
        {"model.name": str(tiny_model_dir), "fed.num-rounds": ROUNDS, "lora.r": 8}
    )
    run = RunDirectory(tmp_path_factory.mktemp("outputs"), "run")
    run.save_config(cfg)
    base = load_base_model(cfg.model, CPU)
    model = apply_lora(base.model, cfg.lora, base.name_or_path)
    state, lora_cfg = init_adapter(cfg.model, cfg.lora, base.name_or_path, seed=0)
    load_adapter_state(model, state)

    train, held_out = train_eval_split(load_records(cfg.data), 0.1, seed=0)
    train_examples = tokenize_dataset(
        train.shuffle(seed=0).select(range(128)), base.tokenizer, cfg.data
    )
    eval_examples = tokenize_dataset(held_out.select(range(32)), base.tokenizer, cfg.data)
    batches = cycle_batches(make_dataloader(train_examples, 8, shuffle=True, seed=0))
    torch.manual_seed(0)
    for server_round in range(1, ROUNDS + 1):
        stats = train_adapter(model, batches, steps=12, learning_rate=2e-2)
        quality = evaluate(model, make_dataloader(eval_examples, 16, shuffle=False, seed=0))
        run.save_adapter(adapter_state(model), lora_cfg, round_name(server_round))
        run.append_metrics(
            {
                "round": server_round,
                "seconds": 1.5 + server_round,
                "train-loss": stats.loss,
                "eval-loss": quality.loss,
                "eval-perplexity": quality.perplexity,
                "eval-token-accuracy": quality.token_accuracy,
                "clients-sampled": 3,
                "clients-replied": 3 if server_round != 2 else 2,
                "clients-dropped": 0 if server_round != 2 else 1,
                "dropped": {} if server_round != 2 else {"7": "timed out"},
                "bytes-up": 1000 * server_round,
                "bytes-down": 3000 * server_round,
                "epsilon": 0.25 * server_round,
                "updated": True,
            }
        )
    run.save_adapter(adapter_state(model), lora_cfg, FINAL_ADAPTER)
    run.write_summary({"rounds": ROUNDS, "final-adapter": str(run.path / FINAL_ADAPTER)})
    return run.path


def write_metrics(run_dir: Path, lines: list[str]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + "\n")
    return run_dir


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def test_report_writes_table_plot_and_tensorboard(trained_run: Path) -> None:
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Prepare
    rows = read_run(trained_run).rows

    # Execute
    written = write_report(trained_run)

    # Assert: the markdown table has one line per round with the recorded values
    table = written["table"].read_text()
    for row in rows:
        assert f"| {row['round']} | {row['train-loss']:.4f} | {row['eval-loss']:.4f} |" in table
    header = next(line for line in table.splitlines() if line.startswith("| round"))
    assert "| epsilon |" in header
    assert "round 2, node 7: timed out" in table
    assert "3 of 3 rounds, finished" in table

    # Assert: a real PNG that decodes to an RGBA image
    png = written["plot"]
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300

    # Assert: TensorBoard holds each scalar once per round, with the recorded value
    events = EventAccumulator(str(written["tensorboard"]))
    events.Reload()
    for tag, key in (
        ("loss/eval", "eval-loss"),
        ("loss/train", "train-loss"),
        ("eval/perplexity", "eval-perplexity"),
        ("privacy/epsilon", "epsilon"),
        ("traffic/bytes-up", "bytes-up"),
        ("clients/dropped", "clients-dropped"),
        ("time/round-seconds", "seconds"),
    ):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        np.testing.assert_allclose([e.value for e in logged], [r[key] for r in rows], rtol=1e-6)


def test_plot_draws_the_recorded_series(trained_run: Path) -> None:
    # Prepare
    rows = read_run(trained_run).rows

    # Execute
    figure = plot_rounds(rows)

    # Assert: three panels (epsilon is recorded) and lines that carry the rows' values
    lines = {line.get_label(): line for axes in figure.axes for line in axes.get_lines()}
    assert [a.get_title() for a in figure.axes] == ["loss", "perplexity", "epsilon"]
    assert set(lines) == {"train loss", "eval loss", "eval perplexity", "epsilon"}
    assert list(lines["eval loss"].get_xdata()) == [1, 2, 3]
    np.testing.assert_allclose(lines["eval loss"].get_ydata(), [r["eval-loss"] for r in rows])
    np.testing.assert_allclose(lines["epsilon"].get_ydata(), [0.25, 0.5, 0.75])


def test_regenerating_replaces_tensorboard_events(trained_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Execute
    write_report(trained_run)
    written = write_report(trained_run)

    # Assert: one event file, each round logged once
    assert len(list(written["tensorboard"].glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(written["tensorboard"]))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/eval")] == [1, 2, 3]


def test_partial_run_with_missing_keys(tmp_path: Path) -> None:
    # Prepare: round 2 has no eval metrics, no round has epsilon, the last line is half
    # written (the server is recording round 3 right now), and no summary exists yet.
    run_dir = write_metrics(
        tmp_path / "partial",
        [
            json.dumps({"round": 1, "train-loss": 3.5, "eval-loss": 3.25, "bytes-up": 2048}),
            json.dumps({"round": 2, "train-loss": 2.5, "eval-loss": None, "seconds": 4.0}),
            '{"round": 3, "train-lo',
        ],
    )

    # Execute
    written = write_report(run_dir)
    figure = plot_rounds(read_run(run_dir).rows)

    # Assert: two rounds, missing values shown as "-", no epsilon column or panel
    table = written["table"].read_text()
    assert "| 1 | 3.5000 | 3.2500 | - |" in table
    assert "| 2 | 2.5000 | - | - |" in table
    assert "epsilon" not in table.split("![")[0]
    assert "2 rounds, in progress or interrupted (no config.json)" in table
    assert [a.get_title() for a in figure.axes] == ["loss", "perplexity"]
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert list(lines["eval loss"].get_xdata()) == [1]
    assert list(lines["train loss"].get_xdata()) == [1, 2]
    assert written["plot"].read_bytes()[:8] == PNG_SIGNATURE


def test_the_end_of_run_report_names_each_site_by_its_label(tmp_path: Path) -> None:
    # Prepare: two rounds; node 7's replies named it in round 1, node 8's never did
    from flower_llm.metrics import traffic_summary
    from flower_llm.report import format_outcome

    rows = [
        {
            "round": 1,
            "bytes-up": 3_000_000,
            "bytes-down": 2_000_000,
            "bytes-by-site": {"7": [1_000_000, 1_000_000], "8": [1_000_000, 2_000_000]},
            "site-labels": {"7": "partition 0/2"},
        },
        {
            "round": 2,
            "bytes-up": 500_000,
            "bytes-down": 0,
            "bytes-by-site": {"7": [0, 500_000]},
        },
    ]
    run_dir = write_metrics(tmp_path / "run", [json.dumps(row) for row in rows])

    # Execute
    summary = traffic_summary(rows)
    text = format_outcome(run_dir, {**summary, "status": "ok"})

    # Assert: labelled lines (node id in brackets), the bare node id where none was given
    assert summary["site-labels"] == {"7": "partition 0/2"}
    lines = [line.strip() for line in text.splitlines()]
    assert any(
        re.fullmatch(r"partition 0/2 \[node 7\]\s+1\.000 MB down, 1\.500 MB up", line)
        for line in lines
    ), text
    assert any(re.fullmatch(r"node 8\s+1\.000 MB down, 2\.000 MB up", line) for line in lines)
    assert "communication: 3.500 MB up, 2.000 MB down" in text


def test_unreadable_runs_raise_naming_the_path(tmp_path: Path) -> None:
    # Prepare
    empty_dir = tmp_path / "no-metrics"
    empty_dir.mkdir()
    no_rounds = write_metrics(tmp_path / "no-rounds", [""])
    corrupt = write_metrics(tmp_path / "corrupt", ['{"round": 1}', "not json", '{"round": 3}'])

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=str(empty_dir / METRICS_FILE)):
        write_report(empty_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no finished round"):
        write_report(no_rounds)
    with pytest.raises(ValueError, match=f"{corrupt / METRICS_FILE}:2"):
        write_report(corrupt)


def test_cli_report_prints_the_table(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code, out, _ = run_cli(["report", str(trained_run)], capsys)

    # Assert
    rows = read_run(trained_run).rows
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split()[:4] == ["round", "train", "loss", "eval"]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "3"]
    assert f"{rows[2]['eval-loss']:.4f}" in lines[4]
    assert (trained_run / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE


class FakeWandb:
    """Records what the report would send to Weights & Biases."""

    def __init__(self) -> None:
        self.init_kwargs: dict[str, Any] = {}
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.finished = False
        self.summary: dict[str, Any] = {}

    def init(self, **kwargs: Any) -> FakeWandb:
        self.init_kwargs = kwargs
        return self

    def log(self, values: dict[str, float], step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


def test_wandb_only_when_asked_and_installed(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("FLOWER_LLM_WANDB_PROJECT", raising=False)

    # Execute / Assert: not asked -> nothing logged
    write_report(trained_run)
    assert fake.logged == []

    # Execute / Assert: asked through the environment -> every round's scalars
    monkeypatch.setenv("FLOWER_LLM_WANDB_PROJECT", "flower-llm-test")
    write_report(trained_run)
    assert fake.init_kwargs["project"] == "flower-llm-test"
    assert [step for step, _ in fake.logged] == [1, 2, 3]
    assert fake.logged[2][1]["privacy/epsilon"] == pytest.approx(0.75)
    assert fake.finished

    # Execute / Assert: asked but not installed -> a warning, and the report still written
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    (trained_run / "report.md").unlink()
    write_report(trained_run)
    assert "wandb is not installed" in caplog.text
    assert (trained_run / "report.md").is_file()


# --------------------------------------------------------------------------------------
# merge, generate, evaluate
# --------------------------------------------------------------------------------------


def test_merge_gives_the_logits_of_base_plus_adapter(
    trained_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Prepare
    out = tmp_path / "merged"
    ids = torch.randint(6, 100, (2, 20), generator=torch.Generator().manual_seed(0))

    # Execute
    code, stdout, _ = run_cli(
        ["merge", "--run", str(trained_run), "--out", str(out), "--dtype", "float32"], capsys
    )

    # Assert: a standard HF directory whose logits are base + adapter's
    assert code == 0 and stdout.strip() == str(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        reference = PeftModel.from_pretrained(base, trained_run / FINAL_ADAPTER).eval()
        expected = reference(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (expected - base_logits).abs().max() > 0.1  # the adapter really changes the model
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def greedy_reference(run_dir: Path, tiny_model_dir: Path, instruction: str, tokens: int) -> str:
    """The greedy answer computed without the CLI: nf4 base, PeftModel, the template."""
    from peft import PeftModel

    cfg = parse_run_config({"model.name": str(tiny_model_dir), "lora.r": 8})
    base = load_base_model(cfg.model, CPU)
    model = PeftModel.from_pretrained(base.model, run_dir / FINAL_ADAPTER).eval()
    tokenizer = base.tokenizer
    prompt = cfg.data.prompt_template.format(instruction=instruction)
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, use_cache=True
        )
    return str(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)).strip()


def test_generate_prints_the_greedy_completion(
    trained_run: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    question = "What is the usual dose of ibuprofen for fever?"

    # Execute
    code, out, _ = run_cli(
        ["generate", "--run", str(trained_run), "--prompt", question, "--max-new-tokens", "20"],
        capsys,
    )

    # Assert
    assert code == 0
    assert out.strip() != ""
    assert out.strip() == greedy_reference(trained_run, tiny_model_dir, question, 20)


def test_evaluate_reports_loss_and_exact_match(
    trained_run: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: one reference the model is known to produce, one it cannot produce
    question = "Turn on the lamp in the garage at 5 o'clock."
    answer = greedy_reference(trained_run, tiny_model_dir, question, 24)
    data = tmp_path / "qa.jsonl"
    data.write_text(
        json.dumps({"instruction": question, "response": answer})
        + "\n"
        + json.dumps({"instruction": "Is the fan in the office on?", "response": "purple 42"})
        + "\n"
    )

    # Execute
    code, out, _ = run_cli(
        [
            "evaluate",
            "--data",
            str(data),
            "--run",
            str(trained_run),
            "--max-new-tokens",
            "24",
            "--json",
        ],
        capsys,
    )

    # Assert
    result = json.loads(out)
    assert code == 0
    assert result["exact-match"] == 0.5 and result["exact-match-count"] == 1
    assert math.isfinite(result["loss"]) and result["loss"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert 0.0 <= result["token-accuracy"] <= 1.0
    assert result["examples"] == 2


def test_evaluate_adapter_beats_base_on_embedded(
    trained_run: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    common = ["--data", "embedded", "--limit", "16", "--no-exact-match", "--json"]
    code_run, out_run, _ = run_cli(["evaluate", "--run", str(trained_run), *common], capsys)
    code_base, out_base, _ = run_cli(["evaluate", "--model", str(tiny_model_dir), *common], capsys)

    # Assert: the trained adapter fits the data better than the random base
    run, base = json.loads(out_run), json.loads(out_base)
    assert code_run == code_base == 0
    assert run["examples"] == base["examples"] == 16
    assert run["loss"] < base["loss"] - 0.1
    assert "exact-match" not in run


def test_evaluate_task_scores_the_adapter_against_chance(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the same adapter and 4-bit load, scored in-process
    from argparse import Namespace

    from flower_llm.cli import load_for_inference, resolve_source
    from flower_llm.tasks import bundled_task_file, load_task, score_task

    adapter = trained_run / FINAL_ADAPTER
    source = resolve_source(
        Namespace(run=None, model=None, adapter=str(adapter), base=None, quantization=None)
    )
    model, tokenizer = load_for_inference(source, CPU)
    expected = score_task(
        model, tokenizer, load_task(bundled_task_file("medical")), source.cfg.data
    )

    # Execute: a PEFT directory alone (its run's settings), and the run with its adapter
    code, out, _ = run_cli(
        ["evaluate", "--adapter", str(adapter), "--task", "medical", "--json"], capsys
    )
    code_run, out_run, _ = run_cli(
        ["evaluate", "--run", str(trained_run), "--task", "medical", "--json"], capsys
    )

    # Assert
    result = json.loads(out)
    assert code == code_run == 0
    assert source.cfg.lora.r == 8 and source.cfg.model.quantization == "nf4"  # the run's
    assert result == json.loads(out_run)
    assert result["correct"] == expected.correct and result["questions"] == 30
    assert result["accuracy"] == pytest.approx(expected.accuracy)
    assert result["chance"] == 0.25 and result["scoring"] == "loglik"


@pytest.mark.long  # lm-eval imports and sets up for ~15 s
def test_lm_eval_on_a_bundled_task_file_equals_the_built_in_evaluator(
    trained_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: nothing may be downloaded
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = str(trained_run / FINAL_ADAPTER)

    # Execute: lm-eval on a local YAML task over the bundled file; the built-in evaluator
    code, out, _ = run_cli(
        ["evaluate", "--adapter", adapter, "--lm-eval", "medical,finance", "--json"], capsys
    )
    built_in = {}
    for domain in ("medical", "finance"):
        code_task, out_task, _ = run_cli(
            ["evaluate", "--adapter", adapter, "--task", domain, "--json"], capsys
        )
        assert code_task == 0
        built_in[domain] = json.loads(out_task)

    # Assert: the same accuracy, question for question
    results = json.loads(out)
    assert code == 0
    for domain in ("medical", "finance"):
        lm_eval = results[f"flower_llm_{domain}"]
        assert lm_eval["sample_len"] == built_in[domain]["questions"] == 30
        assert lm_eval["acc,none"] == pytest.approx(built_in[domain]["accuracy"], abs=1e-12)
        assert lm_eval["chance"] == 0.25


class LossyTokenizer:
    """Character-level, but decodes digits apart ("400" -> "4 0 0"), as some word-level
    tokenizers do."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return re.sub(r"(?<=\d)(?=\d)", " ", "".join(chr(i) for i in ids))


def test_exact_match_compares_through_the_tokenizer() -> None:
    # Prepare
    tokenizer = LossyTokenizer()
    reference = "The usual dose of ibuprofen for fever is 400 mg, taken with water."
    generated = tokenizer.decode(tokenizer(reference)["input_ids"])

    # Execute / Assert: equal after the round trip, not before it
    assert generated != reference
    assert exact_match(f"  {generated}\n", reference, tokenizer)
    assert not exact_match(generated.replace("4 0 0", "5 0 0"), reference, tokenizer)
    assert not exact_match(generated + " Yes", reference, tokenizer)


# --------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------


def real_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor a loaded 4-bit model holds: parameters, buffers, quant states."""
    import bitsandbytes as bnb

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            for part in (state, state.state2):
                for value in vars(part).values() if part is not None else ():
                    if isinstance(value, torch.Tensor):
                        tensors[id(value)] = value
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_plan_weights_match_a_real_4bit_load(tiny_model_dir: Path) -> None:
    # Prepare
    cfg = parse_run_config({"model.name": str(tiny_model_dir), "lora.r": 16})
    base = load_base_model(cfg.model, CPU)
    real = real_weight_bytes(base.model)
    real_lora = sum(v.size for v in adapter_state(apply_lora(base.model, cfg.lora)).values())

    # Execute
    plan = estimate_memory(load_model_config(str(tiny_model_dir)), PlanSettings(lora_r=16))

    # Assert: weights within 1 % of what bitsandbytes allocated; LoRA exactly
    assert abs(plan.weight_bytes - real) / real < 0.01
    assert plan.lora_parameters == real_lora
    assert plan.lora_bytes == 16 * real_lora


def measured_layer_bytes(model_dir: Path, overrides: dict[str, Any]) -> float:
    """Bytes per token that autograd keeps for the last decoder layer, measured."""
    from flower_llm.train import token_losses

    cfg = parse_run_config({"model.name": str(model_dir), **overrides})
    base = load_base_model(cfg.model, CPU)
    model = apply_lora(base.model, cfg.lora)
    last = model.base_model.model.model.layers[-1]
    inside = [False]
    last.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    last.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(6, 100, (2, 48), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_losses(
            model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        )
    return sum(kept.values()) / ids.numel()


@pytest.mark.parametrize(
    ("overrides", "settings"),
    [
        ({}, PlanSettings()),
        (
            {"model.quantization": "none", "lora.target-modules": "q_proj,v_proj"},
            PlanSettings(quantization="none", target_modules="q_proj,v_proj"),
        ),
        ({"model.fp32-stream": False}, PlanSettings(fp32_stream=False)),
    ],
    ids=["nf4-all-linear", "bf16-q-v", "nf4-bf16-stream"],
)
def test_plan_activation_formula_matches_saved_tensors(
    tiny_model_dir: Path, overrides: dict[str, Any], settings: PlanSettings
) -> None:
    # Prepare
    measured = measured_layer_bytes(tiny_model_dir, {"lora.r": 16, **overrides})

    # Execute
    plan = estimate_memory(load_model_config(str(tiny_model_dir)), settings)

    # Assert
    assert plan.layer_activation_bytes == pytest.approx(measured, rel=0.02)


def test_layer_formula_by_hand() -> None:
    # Prepare: the Llama-3-8B layer, quantized (fp32 stream), LoRA r=16 on all 7 linears
    shape = ModelShape("llama", 32, 4096, 14336, 32, 1024, 128256)
    h, i, kv = 4096, 14336, 1024
    adapted = [
        AdaptedLinear(name, 0, width, 16)
        for name, width in (
            ("q_proj", h),
            ("k_proj", h),
            ("v_proj", h),
            ("o_proj", h),
            ("gate_proj", h),
            ("up_proj", h),
            ("down_proj", i),
        )
    ]

    # Execute
    quantized = layer_activation_bytes(shape, 4, adapted)
    bf16 = layer_activation_bytes(shape, 2, adapted)

    # Assert: the closed forms in flower_llm.plan's docstring
    assert quantized == 4 * (6 * h + 2 * kv + 4 * i + 7 * 16 + 32 + 2)
    assert bf16 == 8 * h + 8 + 2 * (2 * h + 2 * kv) + 4 * 32 + 6 * i + 4 * (6 * h + i) + 7 * 64


def test_attention_scores_part_by_hand(tmp_path: Path) -> None:
    # Prepare: Llama-3-8B's layer (32 heads, 8 KV heads) and one without grouped KV heads
    grouped = ModelShape("llama", 32, 4096, 14336, 32, 1024, 128256)
    ungrouped = ModelShape("llama", 32, 4096, 14336, 32, 4096, 128256)

    # Execute
    nf4 = attention_score_bytes(grouped, PlanSettings(seq_len=512))
    bf16 = attention_score_bytes(grouped, PlanSettings(seq_len=512, quantization="none"))
    fp32 = attention_score_bytes(
        grouped, PlanSettings(quantization="none", compute_dtype="float32")
    )
    plain_heads = attention_score_bytes(ungrouped, PlanSettings(seq_len=512))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(LLAMA_3_8B))
    config = load_model_config(str(config_file))
    plan = estimate_memory(config, PlanSettings())
    checkpointed = estimate_memory(config, PlanSettings(gradient_checkpointing=True))

    # Assert: fp32 q/k/v with grouped KV heads keep 4 n_h T bytes a token and layer
    assert nf4 == fp32 == 4 * 32 * 512
    assert bf16 == 0 and plain_heads == 0
    assert plan.attention_score_bytes == 32 * (4 * 512) * 4 * 32 * 512  # 4 GiB
    assert checkpointed.attention_score_bytes == plan.attention_score_bytes // 32


def test_plan_is_within_ten_percent_of_the_peaks_measured_on_a_gpu() -> None:
    # Prepare: the peaks benchmarks.gpu_qlora recorded on an H200 (benchmarks/results)
    from benchmarks.gpu_qlora import CONFIGS, GPU_ARCHITECTURES
    from benchmarks.wire_bytes import hf_config

    results = sorted((Path(__file__).parent.parent / "benchmarks/results").glob("gpu_qlora*.json"))
    rows = [
        (run, name, row)
        for file in results
        if "cpu_check" not in file.name
        for run in json.loads(file.read_text())["runs"]
        for name, row in run["configs"].items()
        if not CONFIGS[name].dpsgd  # the plan does not count Opacus' per-example gradients
    ]
    assert len(rows) >= 6, "the recorded GPU results are missing"

    for run, name, row in rows:
        # Execute
        quantization, checkpointing, fp32_stream, _ = CONFIGS[name]
        plan = estimate_memory(
            hf_config(GPU_ARCHITECTURES[run["arch"]]),
            PlanSettings(
                seq_len=run["seq-len"],
                batch_size=run["batch-size"],
                quantization=quantization,
                gradient_checkpointing=checkpointing,
                fp32_stream=fp32_stream,
            ),
        )

        # Assert: PyTorch's peak allocation against the plan less its CUDA context
        ratio = row["vram-peak"] / (plan.total_bytes - plan.cuda_context_bytes)
        assert 0.85 < ratio < 1.10, f"{run['arch']} {name}: peak / plan = {ratio:.3f}"


def test_plan_llama_3_8b_numbers(tmp_path: Path) -> None:
    # Prepare
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(LLAMA_3_8B))

    # Execute
    config = load_model_config(str(config_file))
    plan = estimate_memory(config, PlanSettings(), gpu_bytes=24 * GIB)
    checkpointed = estimate_memory(config, PlanSettings(gradient_checkpointing=True))

    # Assert: Llama-3-8B's published size and the known LoRA r=16 all-linear count
    assert plan.num_parameters == 8_030_261_248
    assert plan.lora_parameters == 41_943_040
    # NF4 + double quant: 0.516 B per linear weight
    assert 3.2 * GIB < plan.quantized_weight_bytes < 3.5 * GIB
    # embeddings + lm_head (2 x 128256 x 4096) and norms, upcast to fp32 by the loader
    assert plan.other_parameters == 2 * 128256 * 4096 + 65 * 4096
    assert 3.9 * GIB < plan.other_weight_bytes < 4.0 * GIB
    # checkpointing keeps one layer's activations plus each layer's input
    assert checkpointed.activation_bytes < plan.activation_bytes / 8
    assert plan.logits_bytes == 4 * 512 * 128256 * 12
    assert plan.total_bytes == (
        plan.weight_bytes
        + plan.lora_bytes
        + plan.activation_bytes
        + plan.attention_score_bytes
        + plan.logits_bytes
        + GIB // 2
    )


def test_plan_cli_fits_and_does_not_fit(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(LLAMA_3_8B))
    llama = ["plan", "--model", str(config_file), "--gradient-checkpointing"]

    # Execute
    fits = run_cli([*llama, "--gpu-mem", "24GiB"], capsys)
    too_small = run_cli([*llama, "--gpu-mem", "4GiB"], capsys)
    unchecked = run_cli(["plan", "--model", str(config_file), "--gpu-mem", "24GiB"], capsys)
    bf16_stream = run_cli([*llama, "--no-fp32-stream", "--gpu-mem", "24GiB"], capsys)
    tiny = run_cli(["plan", "--model", str(tiny_model_dir), "--gpu-mem", "2GiB"], capsys)

    # Assert
    assert fits[0] == 0 and "fits in 24.00 GiB" in fits[1]
    assert too_small[0] == 1 and "does not fit in 4.00 GiB" in too_small[1]
    assert too_small[1].rstrip().endswith("try --no-fp32-stream")
    assert unchecked[1].rstrip().endswith("try --gradient-checkpointing and --no-fp32-stream")
    assert "attention scores" in unchecked[1] and "attention scores" not in bf16_stream[1]
    assert "other weights" in bf16_stream[1] and "norms in bfloat16" in bf16_stream[1]
    assert "quantized linear weights" in fits[1] and "8.03 B parameters" in fits[1]
    assert tiny[0] == 0 and "fits in 2.00 GiB" in tiny[1]


def test_plan_cli_plans_the_runs_own_settings(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: the app's run config (this checkout's pyproject.toml) with overrides
    app = str(Path(__file__).resolve().parents[1])
    overrides = f'model.name="{tiny_model_dir}" train.batch-size=2 data.max-seq-length=64 lora.r=4'

    # Execute
    planned = run_cli(
        ["plan", "--app", app, "--run-config", overrides, "--gpu-mem", "1MiB"], capsys
    )
    defaults = run_cli(["plan", "--app", app, "--run-config", ""], capsys)
    mixed = run_cli(["plan", "--app", app, "--run-config", "", "--batch-size", "2"], capsys)
    typo = run_cli(["plan", "--app", app, "--run-config", "train.batchsize=2"], capsys)

    # Assert: the run's settings, the hints as run-config keys, mistakes named
    expected = estimate_memory(
        load_model_config(str(tiny_model_dir)),
        PlanSettings(seq_len=64, batch_size=2, lora_r=4, target_modules="all-linear"),
    )
    assert planned[0] == 1 and "batch 2 x 64 tokens, LoRA r=4" in planned[1]
    total = next(line for line in planned[1].splitlines() if line.split()[0] == "total")
    assert total.split()[1:] == format_bytes(expected.total_bytes).split()
    assert (
        planned[1]
        .rstrip()
        .endswith("try model.gradient-checkpointing = true and model.fp32-stream = false")
    )
    assert defaults[0] == 0 and "Memory plan for embedded" in defaults[1]
    assert "batch 8 x 128 tokens" in defaults[1]  # pyproject.toml's defaults
    assert mixed[0] == 2 and "set train.batch-size (not --batch-size) in it" in mixed[2]
    assert typo[0] == 2 and "did you mean 'train.batch-size'" in typo[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 * GIB), ("24 GB", 24 * 10**9), ("512MiB", 512 * 2**20), ("16", 16 * GIB)],
)
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


# --------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------


@pytest.fixture
def run_without_adapter(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the run's metrics and config, but no adapter directory."""
    run_dir = tmp_path / "no-adapter"
    run_dir.mkdir()
    for name in ("config.json", METRICS_FILE):
        shutil.copy(trained_run / name, run_dir / name)
    return run_dir


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "{tmp}/nowhere"], "run directory {tmp}/nowhere does not exist"),
        (["generate", "--run", "{bare}", "--prompt", "hi"], "has no adapter"),
        (
            ["generate", "--run", "{run}", "--adapter", "round-009", "--prompt", "hi"],
            "no adapter 'round-009'",
        ),
        (["merge", "--run", "{run}", "--out", "{run}"], "exists and is not empty"),
        (["evaluate", "--data", "{tmp}/missing.jsonl", "--run", "{run}"], "no such data file"),
        (
            ["evaluate", "--task", "{tmp}/gone.jsonl", "--run", "{run}"],
            "task file {tmp}/gone.jsonl",
        ),
        (["evaluate", "--task", "medical", "--adapter", "{tmp}"], "is not an adapter directory"),
        (["evaluate", "--task", "medical"], "--run RUN_DIR, --model NAME_OR_PATH or --adapter"),
        (["plan", "--model", "{tmp}/no-model"], "no such file or directory"),
        (["plan", "--model", "{tmp}", "--gpu-mem", "8GiB"], "has no config.json"),
        (["plan", "--model", "x", "--gpu-mem", "lots"], "cannot read memory size 'lots'"),
        (["plan", "--model", "x", "--seq-len", "0"], "expected a positive integer"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(
    argv: list[str],
    message: str,
    trained_run: Path,
    run_without_adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    names = {"tmp": str(tmp_path), "run": str(trained_run), "bare": str(run_without_adapter)}
    argv = [a.format(**names) for a in argv]

    # Execute
    code, out, err = run_cli(argv, capsys)

    # Assert
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2
    assert len(error_lines) == 1 and message.format(**names) in error_lines[0]
    assert "Traceback" not in err and out == ""


def test_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    # Prepare
    script = Path(sys.executable).with_name("flower-llm")

    # Execute
    result = subprocess.run(
        [str(script), "plan", "--model", "x", "--gpu-mem", "lots"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # Assert: argparse's usage, then one error line naming the bad value
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "flower-llm plan: error: argument --gpu-mem: cannot read memory size 'lots': "
        "use a number and a unit, e.g. 8GiB, 24GB, 512MiB"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""
