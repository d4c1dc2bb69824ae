"""Measured peak memory of one unlearning stage on CPU beside mansu.preflight's estimate of it.

The config is composed from the real conf/ with the given overrides; a random Llama of the
config's architecture (preflight's numbers) is built in the storage dtype, and the method's own
`unlearn` runs on texts long enough that every batch holds batch_size × max_length tokens.

What is measured: the peak of live torch CPU tensor bytes. The torch profiler (profile_memory)
records every allocation and free of the CPU allocator; their running sum plus the tensors alive
before (the model's parameters and buffers) is exactly the memory the estimate models: weights,
gradients, optimizer state, reference copy, activations. Whole-process RSS (`ru_maxrss`) also
counts the interpreter, torch's libraries and allocator slack, so it is printed beside it but not
compared. Run one measurement per process (the harness does), since RSS never goes down.

Run: python scripts/measure_peaks.py model=tiny method=npo method.batch_size=4 method.max_length=64
"""

from __future__ import annotations

import json
import random
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("virus tick river salt cave spore fever plague bread wool bridge stone sea winter city "
         "bakers trade carried grows cured spreads flows sells has tall cold warm old new dawn "
         "north south east west small large red blue green quiet loud early late").split()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_tensor_bytes(profiler, before: int) -> int:
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = before
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(overrides: list[str]) -> dict:
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig, LlamaForCausalLM

    from mansu.context import RunContext
    from mansu.data import Split
    from mansu.models.loaders import build_tokenizer
    from mansu.preflight import architecture_of, estimate

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["device=cpu", "method.max_steps=1",
                                             "method.stop_forget_acc=null", *overrides])
    est = estimate(cfg)
    unlearn_stage = next(s for s in est.stages if s.name == "unlearn")
    arch, _ = architecture_of(cfg.model)
    length = cfg.method.max_length
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(length + 8)) for _ in range(64)]
    tokenizer = build_tokenizer(texts, vocab_size=min(arch.vocab_size, 1000))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim, tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=max(256, length)))
    ctx = RunContext(seed=0, storage=cfg.storage, device="cpu")
    model = model.to(ctx.param_dtype)
    if cfg.get("gradient_checkpointing"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    before = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    forget, retain = Split([], texts[:32]), Split([], texts[32:])
    rss_before = rss_mib()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        instantiate(cfg.method)(model, tokenizer, forget, retain, ctx)
    measured = peak_tensor_bytes(prof, before)
    return {"overrides": overrides, "parameters": arch.parameters,
            "estimated_bytes": unlearn_stage.total, "measured_bytes": measured,
            "ratio": unlearn_stage.total / measured,
            "estimate_parts": unlearn_stage.parts,
            "rss_mib_before": round(rss_before, 1), "rss_mib_peak": round(rss_mib(), 1)}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1:])))
