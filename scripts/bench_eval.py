"""Benchmark mansu.evaluate.mcq against lm-eval and against the bare forward passes it needs.

The model is a randomly initialised 100M-parameter Llama shaped like the small real models
this project evaluates (SmolLM2-135M, Llama-3.2-1B scaled down): hidden 768, 12 layers,
12 heads (4 KV heads), intermediate 2048, tied embeddings and a 32,000-token vocabulary, so the
vocabulary projection costs what it costs in a real model (a quarter of the parameters). The
tokenizer is a byte-level BPE trained here on the question vocabulary, so a word is about one
token as with a real tokenizer; its ids are a subset of the model's vocabulary. Questions are
generated: 8-40 words, four choices of 1-6 words (WMDP-like lengths, shorter than MMLU's).

Printed, from one run that times each path once on the same questions (see make_clock for the
clock; on a shared CPU the load of other processes still adds some noise):
- ``speed ratio vs lm-eval``: mansu throughput / lm-eval throughput (lm-eval's time is the whole
  ``simple_evaluate`` call on an in-memory model, as the standard path runs it);
- ``floor ratio``: mansu time per question / time per question of the forward passes alone
  (tokenised and padded beforehand; same batch size, right padding, rows sorted by length) over
  exactly the token rows the scoring must run (every question+choice for cloze, one prompt per
  question for letter), computing logits only at the scored positions;
- ``predictions equal``: mansu's predictions against lm-eval's, question by question.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_eval.py --questions 200 --scoring cloze
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mansu.data import MCQ
from mansu.evaluate.lm_eval_tasks import lm_eval_accuracy, write_local_task
from mansu.evaluate.mcq import encode_pairs, evaluate_mcq, mcq_requests

MODEL_CONFIG = {
    "vocab_size": 32_000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
NOUNS = (
    "virus", "bacterium", "toxin", "protein", "gene", "enzyme", "cell", "tick", "mosquito", "river",
    "mountain", "city", "vaccine", "antibody", "pathogen", "spore", "receptor", "membrane",
    "culture", "sample", "strain", "host", "vector", "genome", "plasmid", "reactor", "isotope",
    "compound", "solvent", "catalyst"
)
OTHER_WORDS = (
    "the", "a", "of", "in", "by", "for", "with", "which", "what", "where", "when", "does", "is",
    "are", "was", "carried", "found", "known", "spread", "through", "water", "air", "blood", "soil",
    "into", "from", "most", "often", "used", "against", "during", "after", "before", "between",
    "under", "primary", "common", "rare"
)


def make_questions(n: int, seed: int = 0) -> list[MCQ]:
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(NOUNS + OTHER_WORDS) for _ in range(rng.randint(low, high)))

    return [MCQ(words(8, 40).capitalize() + "?", tuple(words(1, 6) for _ in range(4)),
                rng.randrange(4)) for _ in range(n)]


def make_tokenizer(questions: list[MCQ]) -> PreTrainedTokenizerFast:
    corpus = [q.question + " " + " ".join(q.choices) for q in questions]
    corpus += [mcq_requests(q, "letter")[0] + " " + "ABCD"[q.answer] for q in questions]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def floor_seconds(model, tokenizer, questions: list[MCQ], scoring: str, batch_size: int,
                  clock) -> float:
    """Forward passes alone over the token rows the scoring needs, built beforehand, with the
    vocabulary projection only where a continuation token is scored: the least work any
    implementation must do."""
    pairs = [(ctx, cont) for q in questions for ctx, conts in [mcq_requests(q, scoring)]
             for cont in conts]
    kept: dict[tuple[int, ...], int] = {}
    for ctx, cont in encode_pairs(tokenizer, pairs):
        row = tuple(ctx + cont[:-1])
        kept[row] = max(kept.get(row, 0), len(cont))
    rows = sorted(kept, key=len, reverse=True)
    batches = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        input_ids = torch.full((len(batch), len(batch[0])), tokenizer.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, row in enumerate(batch):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            keep[i, len(row) - kept[row] : len(row)] = True
        batches.append({"input_ids": input_ids.to(model.device),
                        "attention_mask": attention_mask.to(model.device),
                        "logits_to_keep": keep.to(model.device)})
    start = clock()
    with torch.inference_mode():
        for inputs in batches:
            model(**inputs, use_cache=False)
    return clock() - start


def make_clock(device: torch.device):
    """Seconds on the clock that load from other processes disturbs least: on CPU this process's
    CPU time (with one torch thread no time is spent spinning for a descheduled sibling), on a
    GPU wall time after the queued kernels have finished."""
    if device.type == "cuda":
        def wall() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
        return wall
    return time.process_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--scoring", choices=["cloze", "letter"], default="cloze")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    questions = make_questions(args.questions)
    tokenizer = make_tokenizer(questions)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    clock = make_clock(model.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: random Llama, {n_params / 1e6:.1f}M parameters, {args.dtype}, {args.device}, "
          f"torch threads {torch.get_num_threads()}; tokenizer vocab {len(tokenizer)}; "
          f"{args.questions} questions, {args.scoring}, batch size {args.batch_size}; clock: "
          f"{'wall' if model.device.type == 'cuda' else 'process CPU time'}")

    # Warm up on every batch shape (a GPU pays for each new shape once) and on mansu's own
    # operations, so that no path pays first-call costs.
    floor_seconds(model, tokenizer, questions, args.scoring, args.batch_size, clock)
    evaluate_mcq(model, tokenizer, questions[: args.batch_size], scoring=args.scoring,
                 batch_size=args.batch_size)

    floor = floor_seconds(model, tokenizer, questions, args.scoring, args.batch_size, clock)
    start = clock()
    ours = evaluate_mcq(model, tokenizer, questions, scoring=args.scoring,
                        batch_size=args.batch_size)
    ours_s = clock() - start
    with tempfile.TemporaryDirectory() as task_dir:
        task = f"bench_{args.scoring}"
        write_local_task(questions, task_dir, task, args.scoring)
        start = clock()
        reference = lm_eval_accuracy(model, tokenizer, task_dir, task, batch_size=args.batch_size)
        lm_eval_s = clock() - start

    n = len(questions)
    for name, seconds in (("mansu", ours_s), ("lm-eval", lm_eval_s), ("floor", floor)):
        print(f"{name}: {seconds:.2f} s, {seconds / n * 1e3:.1f} ms/question")
    print(f"accuracy: mansu {ours.accuracy:.4f}, lm-eval {reference['accuracy']:.4f}")
    print(f"speed ratio vs lm-eval: {lm_eval_s / ours_s:.2f}")
    print(f"floor ratio: {ours_s / floor:.2f}")
    print(f"predictions equal: {ours.predictions == reference['predictions']}")


if __name__ == "__main__":
    main()
