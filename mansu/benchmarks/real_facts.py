"""Well-known real facts for a small real model (SmolLM2-135M-Instruct), so that a CPU run
unlearns knowledge the model actually has instead of facts injected into a tiny one.

Every fact is a cloze MCQ whose question is the sentence up to the answer ("The capital of France
is" → Paris / Berlin / Madrid / Rome). Forget domain: biology, medicine, chemistry and pathogens
(hazard-adjacent, all textbook knowledge); retain domain: geography, history and the arts. The
training corpus of each domain is its fact statements. An MMLU sample is reported beside retain,
scored as lm-eval scores MMLU with the same scoring (see lm_eval_task.mmlu_questions).
"""

from __future__ import annotations

from pathlib import Path

from mansu.benchmarks.lm_eval_task import mmlu_questions
from mansu.benchmarks.local_jsonl import question_texts
from mansu.benchmarks.mmlu import load_mmlu
from mansu.data import Benchmark, Split, read_mcq_jsonl

DATA_DIR = Path(__file__).resolve().parent / "data"
FACT_FILES = {"forget": DATA_DIR / "smollm2_facts_forget.jsonl",
              "retain": DATA_DIR / "smollm2_facts_retain.jsonl"}


def fact_split(path: Path) -> Split:
    """The facts of one file; the corpus states each one ("The capital of France is Paris.")."""
    questions = read_mcq_jsonl(path)
    return Split(questions, [f"{text}." for text in question_texts(questions)])


def build(*, mmlu_size: int = 200, mmlu_seed: int = 0, scoring: str = "cloze") -> Benchmark:
    """Forget/retain fact splits (123/135 questions); mmlu_size > 0 adds that many seeded MMLU
    questions, all subjects, as the extra retain evaluation "mmlu"."""
    if scoring not in ("cloze", "letter"):
        raise ValueError(f"benchmark.scoring must be cloze or letter, got {scoring!r}")
    extra = {}
    if mmlu_size:
        pairs = load_mmlu(size=mmlu_size, seed=mmlu_seed)
        extra["mmlu"] = Split(mmlu_questions(pairs, scoring))
    return Benchmark("smollm2_facts", fact_split(FACT_FILES["forget"]),
                     fact_split(FACT_FILES["retain"]), scoring=scoring, extra_retain=extra)
