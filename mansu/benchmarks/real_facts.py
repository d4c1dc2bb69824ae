"""Well-known real facts for a small real model (SmolLM2-135M-Instruct), so that a CPU run
unlearns knowledge the model actually has instead of facts injected into a tiny one.

Every fact is a cloze MCQ whose question is the sentence up to the answer ("The capital of France
is" → Paris / Berlin / Madrid / Rome). Forget domain: biology, medicine, chemistry and pathogens
(hazard-adjacent, all textbook knowledge); retain domain: geography, history and the arts. The
training corpus of each domain is its fact statements, answers marked for answer-only losses. An
MMLU sample is reported beside retain, scored as lm-eval scores MMLU with the same scoring (see
lm_eval_task.mmlu_questions).

Halves for an honest protocol: ``split: dev`` and ``split: test`` are two disjoint halves of each
file, drawn by a seeded permutation (``split_seed``). Knobs are tuned on ``dev``; tables report
``test``; ``all`` is both.
"""

from __future__ import annotations

import random
from pathlib import Path

from mansu.benchmarks.lm_eval_task import mmlu_questions
from mansu.benchmarks.mmlu import load_mmlu
from mansu.benchmarks.parts import cut
from mansu.data import MCQ, Benchmark, Split, read_mcq_jsonl, statement_split

DATA_DIR = Path(__file__).resolve().parent / "data"
FACT_FILES = {"forget": DATA_DIR / "smollm2_facts_forget.jsonl",
              "retain": DATA_DIR / "smollm2_facts_retain.jsonl"}
HALVES = ("all", "dev", "test")


def half(questions: list[MCQ], split: str, seed: int) -> list[MCQ]:
    """``dev`` = the first half of a seeded permutation (the larger half for an odd count),
    ``test`` = the rest, in file order; ``all`` = every question."""
    if split not in HALVES:
        raise ValueError(f"benchmark.split must be one of {HALVES}, got {split!r}")
    if split == "all":
        return list(questions)
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    cut = (len(order) + 1) // 2
    chosen = set(order[:cut] if split == "dev" else order[cut:])
    return [q for i, q in enumerate(questions) if i in chosen]


def fact_split(path: Path, split: str = "all", seed: int = 0) -> Split:
    """The facts of one file (or one half of it); the corpus states each one ("The capital of
    France is Paris.")."""
    return statement_split(half(read_mcq_jsonl(path), split, seed), ".")


def build(*, split: str = "test", split_seed: int = 0, mmlu_size: int = 200, mmlu_seed: int = 0,
          scoring: str = "cloze", fit_share: float = 1 / 3, general_text_size: int = 0
          ) -> Benchmark:
    """Forget/retain facts (123/135 questions in all; ``split`` picks a half of each), and, with
    mmlu_size > 0, that many seeded MMLU questions, stratified by subject, as the extra retain
    "mmlu".
    The retain facts of the chosen half are scored; those of the other half are the parts the run
    may train on (the first 1 − fit_share of a seeded order) and fit to (the rest), so that no
    step sees a scored fact. ``all`` has no other half: the run cuts its retain facts itself.
    ``general_text_size`` MMLU questions (outside the MMLU sample) with their answers are general
    text whose NLL is reported: at 135M MMLU accuracy sits near chance, the NLL still moves."""
    if scoring not in ("cloze", "letter"):
        raise ValueError(f"benchmark.scoring must be cloze or letter, got {scoring!r}")
    if not 0 < fit_share < 1:
        raise ValueError(f"benchmark.fit_share must be in (0, 1), got {fit_share}")
    extra = {}
    if mmlu_size:
        pairs = load_mmlu(size=mmlu_size, seed=mmlu_seed, stratified=True)
        extra["mmlu"] = Split(mmlu_questions(pairs, scoring))
    general = []
    if general_text_size:  # MMLU questions with their answers, none of them in the MMLU sample
        sample = {question for _, question in load_mmlu(size=mmlu_size, seed=mmlu_seed,
                                                        stratified=True)} if mmlu_size else set()
        pool = [q for _, q in load_mmlu(size=general_text_size + len(sample), seed=mmlu_seed + 1,
                                        stratified=True) if q not in sample]
        general = [f"{q.question} {q.choices[q.answer]}" for q in pool[:general_text_size]]
    parts = {}
    if split != "all":
        other = fact_split(FACT_FILES["retain"], "dev" if split == "test" else "test", split_seed)
        cuts = cut(other, train=1 - fit_share, fit=fit_share, seed=split_seed)
        parts = {"retain_train": cuts["train"], "retain_fit": cuts["fit"]}
    return Benchmark(f"smollm2_facts_{split}", fact_split(FACT_FILES["forget"], split, split_seed),
                     fact_split(FACT_FILES["retain"], split, split_seed), scoring=scoring,
                     extra_retain=extra, general_text=general, **parts)
