"""The evaluation stage: multiple-choice accuracy of one model on every split of the benchmark."""

from __future__ import annotations

from mansu.data import Benchmark
from mansu.evaluate.mcq import evaluate_mcq
from mansu.settings import EvalSettings


def evaluate(model, tokenizer, benchmark: Benchmark, scoring: str, settings: EvalSettings) -> dict:
    splits = {"forget": benchmark.forget, "retain": benchmark.retain, **benchmark.extra_retain}
    results = {}
    for name, split in splits.items():
        result = evaluate_mcq(model, tokenizer, split.questions, scoring=scoring,
                              batch_size=settings.batch_size,
                              bootstrap_iters=settings.bootstrap_iters)
        results[name] = {**result.to_json(), "correct": list(result.correct)}
    return results
