"""Multiple-choice files in the WMDP schema, given by path; optional JSONL text corpora to train on."""

from __future__ import annotations

from pathlib import Path

from mansu.data import (
    Benchmark,
    BenchmarkFileError,
    Split,
    jsonl_rows,
    read_mcq_jsonl,
    statement_split,
)


def read_corpus_jsonl(path: str | Path) -> list[str]:
    """One {"text": ...} object per line (the format of WMDP's forget/retain corpora)."""
    texts = []
    for lineno, row in jsonl_rows(path, "corpus file"):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BenchmarkFileError(f'{path}:{lineno}: expected a non-empty "text" string')
        texts.append(text)
    return texts


def build(*, forget_path: str, retain_path: str, forget_corpus_path: str | None = None,
          retain_corpus_path: str | None = None, scoring: str = "letter",
          name: str = "local_jsonl") -> Benchmark:
    if scoring not in ("letter", "cloze"):
        raise ValueError(f"benchmark.scoring must be letter or cloze, got {scoring!r}")
    forget_q, retain_q = read_mcq_jsonl(forget_path), read_mcq_jsonl(retain_path)
    forget = (Split(forget_q, read_corpus_jsonl(forget_corpus_path)) if forget_corpus_path
              else statement_split(forget_q))
    retain = (Split(retain_q, read_corpus_jsonl(retain_corpus_path)) if retain_corpus_path
              else statement_split(retain_q))
    return Benchmark(name, forget, retain, scoring=scoring)
