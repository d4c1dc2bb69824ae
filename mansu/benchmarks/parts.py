"""The retain set in three disjoint parts, so that retain is scored on facts no step has seen:

- ``train``: the only retain text a method may train on (every baseline's retain loss, MANSU's
  retain term and its null space);
- ``fit``: what the pipeline fits to the retain set without training on it (circuit selection and
  saliency, MANSU's Fisher, its budget and its held-out check);
- ``eval``: the questions that are scored (``benchmark.retain``), passed to no stage before
  evaluation.

A benchmark that has its own parts (the real facts: the other half's retain facts are train and
fit) keeps them; any other has its retain questions cut by a seeded permutation (``eval.retain_*``
shares). The parts are refused when they overlap: a question (text and answer) in two parts, or an
eval fact stated in a train or fit text. Each part's counts and fingerprint go in the record.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace

from mansu.data import MCQ, Benchmark, BenchmarkFileError, Split, question_texts


def with_retain_parts(benchmark: Benchmark, *, train: float, fit: float, seed: int,
                      min_eval: int) -> Benchmark:
    """The benchmark with ``retain`` = the eval part and ``retain_train``/``retain_fit`` set,
    checked disjoint; an eval part under ``min_eval`` questions is refused."""
    if benchmark.retain_train is None or benchmark.retain_fit is None:
        if not (0 < train and 0 < fit and train + fit < 1):
            raise ValueError(f"eval.retain_train ({train}) and eval.retain_fit ({fit}) must be > 0 "
                             f"with a sum below 1 (the rest is scored)")
        parts = cut(benchmark.retain, train=train, fit=fit, seed=seed)
        benchmark = replace(benchmark, retain=parts["eval"], retain_train=parts["train"],
                            retain_fit=parts["fit"])
    check_disjoint(benchmark)
    if len(benchmark.retain.questions) < min_eval:
        raise BenchmarkFileError(
            f"{benchmark.name}: the retain eval part has {len(benchmark.retain.questions)} "
            f"questions, fewer than eval.min_retain_eval={min_eval} (an interval over so few says "
            f"little); give more retain questions or lower eval.min_retain_eval")
    return benchmark


def cut(split: Split, *, train: float, fit: float, seed: int) -> dict[str, Split]:
    """Questions cut by a seeded permutation; a corpus of their statements goes with them, any
    other corpus (documents of their own) is train text only."""
    n = len(split.questions)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train, n_fit = round(n * train), round(n * fit)
    chosen = {"train": order[:n_train], "fit": order[n_train:n_train + n_fit],
              "eval": order[n_train + n_fit:]}
    statements = _statements_of_questions(split)
    parts = {}
    for name, indices in chosen.items():
        indices = sorted(indices)
        questions = [split.questions[i] for i in indices]
        if statements:
            corpus = [split.corpus[i] for i in indices]
            starts = ([split.answer_starts[i] for i in indices]
                      if split.answer_starts is not None else None)
        else:
            corpus = list(split.corpus) if name == "train" else []
            starts = (list(split.answer_starts) if name == "train"
                      and split.answer_starts is not None else None)
        parts[name] = Split(questions, corpus, answer_starts=starts)
    return parts


def _statements_of_questions(split: Split) -> bool:
    return (len(split.corpus) == len(split.questions)
            and all(text.startswith(q.question) for text, q in zip(split.corpus, split.questions)))


def check_disjoint(benchmark: Benchmark) -> None:
    """Refuse parts that share a question, or a train/fit text that states an eval fact."""
    parts = {"train": benchmark.retain_train, "fit": benchmark.retain_fit,
             "eval": benchmark.retain}
    keys = {name: {_key(q) for q in part.questions} for name, part in parts.items()}
    for a, b in (("train", "eval"), ("fit", "eval"), ("train", "fit")):
        shared = keys[a] & keys[b]
        if shared:
            example = sorted(shared)[0][0]
            raise BenchmarkFileError(f"{benchmark.name}: the retain {a} and {b} parts share "
                                     f"{len(shared)} question(s), e.g. {example!r}; they must be "
                                     f"disjoint (retain is scored on facts no step has seen)")
    seen = [(name, _norm(text)) for name in ("train", "fit") for text in parts[name].corpus]
    for statement in question_texts(benchmark.retain.questions):
        fact = _norm(statement)
        for name, text in seen:
            if fact in text:
                raise BenchmarkFileError(
                    f"{benchmark.name}: a retain {name} text states the eval fact {statement!r}; "
                    f"the eval part must be passed to no stage before evaluation")


def fingerprints(benchmark: Benchmark) -> dict:
    """Counts and a short SHA-256 of each part (questions and texts), for the record."""
    parts = {"forget": benchmark.forget, "retain_train": benchmark.retain_train,
             "retain_fit": benchmark.retain_fit, "retain_eval": benchmark.retain,
             **{f"extra_{k}": v for k, v in benchmark.extra_retain.items()}}
    return {name: {"questions": len(part.questions), "texts": len(part.corpus),
                   "fingerprint": _digest(part)}
            for name, part in parts.items() if part is not None}


def _digest(split: Split) -> str:
    payload = json.dumps([[q.to_json() for q in split.questions], list(split.corpus)],
                         ensure_ascii=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _key(question: MCQ) -> tuple[str, str]:
    return _norm(question.question), _norm(question.choices[question.answer])


def _norm(text: str) -> str:
    return " ".join(text.lower().split())
