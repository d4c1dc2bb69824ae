"""Overhead of EAP-IG attribution over the passes it cannot avoid, on one batch.

    python scripts/bench_attribution.py [--device cpu|cuda] [--repeats 3] [--threads 1]

For a tiny random Llama and a ~100M-parameter random Llama, prints the wall time of
``mansu.attribution.eap_ig.attribute`` on one batch of cloze questions (prompt building, tokenisation and
hooks included) divided by the time of the bare work EAP-IG needs on the same token batch:
2 forward passes (clean, counterfactual) and m forward-backward passes, the backward giving the
gradient of M with respect to the input embeddings only, as attribution's own backward does.
Goal: ratio <= 1.2. Times are medians over ``--repeats`` runs, attribution and baseline
interleaved so that a busy shared CPU slows both alike; one CPU thread by default, because
several threads on an oversubscribed CPU make timings swing by large factors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mansu.attribution.eap_ig import attribute
from mansu.attribution.metric import (
    NEUTRAL_STEM,
    build_rows,
    iter_batches,
    kept_logits,
    neutral_ids,
    row_metric,
)
from mansu.data import MCQ

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUBJECTS = ["Veltrax", "Zorim", "Brano", "Kloum", "Trisel", "Dravin", "Mossa", "Quentar"]
RELATIONS = [("virus is carried by", ["ticks", "bats", "rats", "fleas"]),
             ("virus attacks the", ["liver", "lungs", "heart", "skin"])]
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
}


def questions(n: int) -> list[MCQ]:
    out = []
    for i in range(n):
        relation, choices = RELATIONS[i % len(RELATIONS)]
        out.append(MCQ(f"The {SUBJECTS[i % len(SUBJECTS)]} {relation}", tuple(choices), i % 4))
    return out


def tokenizer_for(items: list[MCQ]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [f"{q.question} {c}." for q in items for c in q.choices] + [NEUTRAL_STEM]
    tok.train_from_iterator(texts * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def baseline_passes(model, batch, ig_steps: int) -> None:
    """2 forward + m forward-backward on the same tokens, nothing else."""
    embed = model.get_input_embeddings()
    with torch.no_grad():
        clean, corrupt = embed(batch.clean), embed(batch.corrupt)
        for embeds in (clean, corrupt):
            row_metric(kept_logits(model, embeds, batch), batch, "cloze")
    for k in range(1, ig_steps + 1):
        point = (corrupt + k / ig_steps * (clean - corrupt)).requires_grad_(True)
        metric = row_metric(kept_logits(model, point, batch), batch, "cloze").sum()
        torch.autograd.grad(metric, point)


def measure(size: str, device: str, repeats: int, n_questions: int, ig_steps: int) -> float:
    torch.manual_seed(0)
    items = questions(n_questions)
    tokenizer = tokenizer_for(items)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size])).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rows = build_rows(tokenizer, items, "cloze",
                            neutral_ids(tokenizer, NEUTRAL_STEM))
    batch = next(iter_batches(rows, len(rows), tokenizer.pad_token_id, device))

    def run_attribution():
        attribute(model, tokenizer, items, scoring="cloze", ig_steps=ig_steps,
                       batch_size=len(rows), progress=False)

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run_attribution()  # warm-up: allocator, kernels, lazy imports
    baseline_passes(model, batch, ig_steps)
    ours, bare = [], []
    for _ in range(repeats):
        ours.append(timed(run_attribution))
        bare.append(timed(lambda: baseline_passes(model, batch, ig_steps)))
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"{size}: {n_params / 1e6:.1f}M parameters, {len(rows)} rows x "
          f"{batch.clean.shape[1]} tokens, m={ig_steps}: attribution "
          f"{statistics.median(ours):.3f}s, 2 fwd + m fwd-bwd {statistics.median(bare):.3f}s")
    print(f"overhead ratio ({size}): {ratio:.2f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=int, default=4, help="cloze: 4 rows per question")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    for size in SIZES:
        measure(size, args.device, args.repeats, args.questions, args.ig_steps)


if __name__ == "__main__":
    main()
