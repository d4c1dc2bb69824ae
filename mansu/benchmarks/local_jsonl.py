"""Multiple-choice files in the WMDP schema, given by path; optional JSONL text corpora to train on."""

from __future__ import annotations

import json
from pathlib import Path

from mansu.data import MCQ, Benchmark, BenchmarkFileError, Split, read_mcq_jsonl


def read_corpus_jsonl(path: str | Path) -> list[str]:
    """One {"text": ...} object per line (the format of WMDP's forget/retain corpora)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"corpus file not found: {path}")
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"] if isinstance(row, dict) else None
                if not isinstance(text, str) or not text.strip():
                    raise ValueError('expected an object with a non-empty "text" string')
            except (ValueError, KeyError) as err:
                raise BenchmarkFileError(f"{path}:{lineno}: {err}") from None
            texts.append(text)
    return texts


def question_texts(questions: list[MCQ]) -> list[str]:
    """Without a corpus, train on each question completed by its correct choice."""
    return [f"{q.question} {q.choices[q.answer]}" for q in questions]


def build(*, forget_path: str, retain_path: str, forget_corpus_path: str | None = None,
          retain_corpus_path: str | None = None, scoring: str = "letter",
          name: str = "local_jsonl") -> Benchmark:
    if scoring not in ("letter", "cloze"):
        raise ValueError(f"benchmark.scoring must be letter or cloze, got {scoring!r}")
    forget_q, retain_q = read_mcq_jsonl(forget_path), read_mcq_jsonl(retain_path)
    forget = Split(forget_q, read_corpus_jsonl(forget_corpus_path) if forget_corpus_path
                   else question_texts(forget_q))
    retain = Split(retain_q, read_corpus_jsonl(retain_corpus_path) if retain_corpus_path
                   else question_texts(retain_q))
    return Benchmark(name, forget, retain, scoring=scoring)
