"""Loading the base causal LM, quantized, ready for k-bit LoRA training.

This is the only module that touches bitsandbytes. The path is the one real users take
with a hub id or a local directory: ``AutoModelForCausalLM.from_pretrained`` with a
``BitsAndBytesConfig``; the embedded default is just a local directory built offline.

A 4-bit base is cached after its first quantization (:class:`QuantizedBaseCache`): the
quantized weights with their bitsandbytes quantization state, saved by transformers as
safetensors, under a key of the source, its files and the quantization settings. Later
loads read that entry and never touch the full-precision weights or quantize again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flower_llm.config import EMBEDDED, ModelConfig

# bitsandbytes' CPU backend logs a failed optional-kernel lookup on every import; the
# fallback it then uses is correct, so the message is noise for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer and where it came from."""

    model: Any  # transformers.PreTrainedModel; Any keeps mypy off transformers' stubs
    tokenizer: PreTrainedTokenizerBase
    name_or_path: str
    device: torch.device


def resolve_model_path(cfg: ModelConfig) -> str:
    """Hub id or directory to load; ``embedded`` builds (once) the tiny offline model."""
    if cfg.name == EMBEDDED:
        from flower_llm.embedded import embedded_model_dir

        return str(embedded_model_dir())
    return cfg.name


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization_config(cfg: ModelConfig) -> Any | None:
    """The ``BitsAndBytesConfig`` for ``cfg.quantization``, or None for full precision."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
    )


def load_base_model(
    cfg: ModelConfig,
    device: torch.device | None = None,
    *,
    cache: QuantizedBaseCache | bool | None = True,
) -> BaseModel:
    """Load tokenizer and (quantized) base model, prepared for k-bit training.

    Call once per client process and reuse across rounds: only adapter weights change
    between rounds.

    Parameters
    ----------
    cfg : ModelConfig
        Which model and how to quantize it.
    device : torch.device | None
        Where to load; default :func:`default_device`.
    cache : QuantizedBaseCache | bool | None
        The pre-quantized base cache for 4-bit bases: ``True`` (default) uses
        :meth:`QuantizedBaseCache.from_env`, ``False``/``None`` loads without one.
    """
    device = device or default_device()
    path = resolve_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; EOS is the usual stand-in and the
        # collator masks pads out of the loss anyway.
        tokenizer.pad_token = tokenizer.eos_token

    quant = quantization_config(cfg)
    if cache is True:
        cache = QuantizedBaseCache.from_env()
    model: Any
    if (
        quant is not None
        and cfg.quantization in CACHED_QUANTIZATIONS
        and isinstance(cache, QuantizedBaseCache)
    ):
        model = cache.load(cfg, path, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quant,
            dtype=DTYPES[cfg.compute_dtype],
            device_map={"": str(device)} if quant is not None else None,
        )
    if quant is None:
        model.to(device)
    if quant is not None:
        keep_4bit_training_layout(model)
    if quant is not None and cfg.fp32_stream:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    return BaseModel(model=model, tokenizer=tokenizer, name_or_path=path, device=device)


def keep_4bit_training_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; return layers set.

    On a CPU with AVX512-BF16, a ``Linear4bit`` in eval mode whose input needs no grad
    rewrites its weight, once and for good, into a packed layout for a faster inference
    kernel (and folds the double-quantized absmax into float32). Every later forward,
    training included, then runs the other kernel: a session that evaluated an adapter
    trained its next round differently (largest adapter difference 6.4e-3 after 2 steps on
    the tiny model) from one that had not, so a resumed simulation drifted from an
    uninterrupted one. Evaluation here is a small share of a round: keep one layout.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def quantized_linear_layers(model: torch.nn.Module) -> dict[str, str]:
    """Names and class names of the bitsandbytes layers in ``model``."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, kinds)
    }


def base_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantized weights included)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def describe(base: BaseModel) -> str:
    """One line on what was loaded, for logs."""
    name = Path(base.name_or_path).name if Path(base.name_or_path).exists() else base.name_or_path
    quantized = len(quantized_linear_layers(base.model))
    return (
        f"{name} on {base.device}: {base_tensor_bytes(base.model) / 2**20:.1f} MiB of tensors, "
        f"{quantized} quantized linear layers"
    )


# --------------------------------------------------------------------------------------
# Pre-quantized base cache
# --------------------------------------------------------------------------------------

CACHED_QUANTIZATIONS = ("nf4", "fp4")
"""Quantizations the cache holds (bitsandbytes 4-bit serialises its quantization state)."""

BASE_CACHE_ENV = "FLOWER_LLM_BASE_CACHE"
"""Directory of quantized bases, or ``off``; default ``$FLOWER_LLM_CACHE/quantized-bases``."""

MANIFEST = "flower-llm-manifest.json"
CACHE_FORMAT = 1

# Files of a model directory that define its weights and architecture; their names, sizes
# and modification times make up a local source's fingerprint (hashing every byte of a
# 15 GB checkpoint on each load would cost more than the cache saves).
_SOURCE_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".pth", ".model")


class CorruptCacheEntry(Exception):
    """A cache entry that does not match its manifest: rebuilt, never used."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(path: str) -> dict[str, Any]:
    """What identifies the weights behind ``path`` (a directory or a hub id).

    A directory: the name, size and mtime of each weight/config file in it. A hub id: the
    commit of its snapshot in the local hub cache when there is one (a new upstream commit
    then makes a new key), else just the id.
    """
    local = Path(path)
    if not local.is_dir():
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not in the local hub cache: the id is all we know
            return {"hub-id": path}
        return {"hub-id": path, "snapshot": local.name}
    files = {}
    for file in sorted(local.iterdir()):
        if file.is_file() and file.name.endswith(_SOURCE_SUFFIXES):
            stat = file.stat()
            files[file.name] = [stat.st_size, stat.st_mtime_ns]
    return {"directory": str(local.resolve()), "files": files}


@dataclass(frozen=True)
class QuantizedBaseCache:
    """Quantized base models saved after their first quantization, one directory each.

    An entry is ``<root>/<key>/``: what ``save_pretrained`` writes for the quantized model
    (``config.json`` with the quantization config, ``model.safetensors`` with the 4-bit
    weights and their quantization state) plus a manifest with the entry's key fields and
    the sha256 of every file. ``key`` hashes the source's fingerprint, the quantization
    settings and the transformers/bitsandbytes versions, so a changed checkpoint, setting
    or library makes a new entry. Every load checks the manifest and the checksums; an
    entry that fails is deleted and rebuilt from the original weights. Entries are built
    in a temporary directory and renamed into place, so readers never see half of one.
    """

    root: Path

    @classmethod
    def from_env(cls) -> QuantizedBaseCache | None:
        """The cache ``$FLOWER_LLM_BASE_CACHE`` names (None for ``off``), else the default."""
        configured = os.environ.get(BASE_CACHE_ENV, "").strip()
        if configured.lower() in ("off", "none", "0", "false"):
            return None
        if configured:
            return cls(Path(configured))
        from flower_llm.embedded import default_cache_root

        return cls(default_cache_root() / "quantized-bases")

    def key_fields(self, cfg: ModelConfig, path: str) -> dict[str, Any]:
        """Everything the quantized weights depend on."""
        import bitsandbytes
        import transformers

        return {
            "format": CACHE_FORMAT,
            "source": source_fingerprint(path),
            "quantization": cfg.quantization,
            "double-quant": cfg.double_quant,
            "compute-dtype": cfg.compute_dtype,
            "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        }

    def entry_dir(self, fields: dict[str, Any]) -> Path:
        """Directory of the entry with these key fields."""
        blob = json.dumps(fields, sort_keys=True).encode()
        return self.root / hashlib.sha256(blob).hexdigest()[:32]

    def load(self, cfg: ModelConfig, path: str, device: torch.device) -> Any:
        """The quantized model of ``path``: from its entry, else quantized and saved."""
        fields = self.key_fields(cfg, path)
        entry = self.entry_dir(fields)
        if entry.exists():
            try:
                self.verify(entry, fields)
                log.info("Quantized base served from cache %s", entry)
                return self._named_after_source(self._from_entry(entry, cfg, device), path)
            except CorruptCacheEntry as err:
                log.warning("Rebuilding quantized base cache entry %s: %s", entry, err)
                shutil.rmtree(entry, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(cfg),
            dtype=DTYPES[cfg.compute_dtype],
            device_map={"": str(device)},
        )
        try:
            self.save(model, entry, fields)
        except OSError as err:  # a full or read-only disk must not stop training
            log.warning("Could not save quantized base to %s: %s", entry, err)
        return model

    def save(self, model: Any, entry: Path, fields: dict[str, Any]) -> None:
        """Write ``model`` as entry ``entry``, atomically (build aside, rename into place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-building-", dir=self.root))
        try:
            model.save_pretrained(staging)
            files = {
                f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
                for f in sorted(staging.iterdir())
                if f.is_file()
            }
            manifest = {"key": fields, "files": files}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            try:
                os.rename(staging, entry)  # refuses a non-empty target: a racer won
                log.info("Saved quantized base to cache %s", entry)
            except OSError:
                if not (entry / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def verify(entry: Path, fields: dict[str, Any]) -> None:
        """Raise :class:`CorruptCacheEntry` unless ``entry`` matches its manifest exactly."""
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise CorruptCacheEntry(f"unreadable manifest ({err})") from err
        if manifest.get("key") != fields:
            raise CorruptCacheEntry("manifest key differs from this load's settings")
        files = manifest.get("files") or {}
        present = {f.name for f in entry.iterdir() if f.is_file()} - {MANIFEST}
        if present != set(files):
            raise CorruptCacheEntry(f"files {sorted(present)} differ from manifest {sorted(files)}")
        for name, meta in files.items():
            file = entry / name
            if file.stat().st_size != meta["size"] or _sha256(file) != meta["sha256"]:
                raise CorruptCacheEntry(f"{name} does not match its checksum")

    @staticmethod
    def _from_entry(entry: Path, cfg: ModelConfig, device: torch.device) -> Any:
        # The entry's config.json carries the quantization config: transformers loads the
        # 4-bit weights and their quantization state as they are, without quantizing.
        return AutoModelForCausalLM.from_pretrained(
            entry, dtype=DTYPES[cfg.compute_dtype], device_map={"": str(device)}
        )

    def _named_after_source(self, model: Any, path: str) -> Any:
        # Loaded from the entry, the model would call itself by the entry's directory, and
        # peft would record that as the adapter's base: keep the user's model name.
        model.name_or_path = path
        model.config._name_or_path = path
        return model
