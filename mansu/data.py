"""The data every stage shares: multiple-choice questions in the WMDP schema, and splits.

A question is ``{"question": str, "choices": [str, str, str, str], "answer": int}`` (the WMDP/MMLU
schema); a split is the questions used to *measure* a domain plus the text used to *train* on it
(the forget corpus of WMDP, or the fact statements of the synthetic benchmark).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LETTERS = ("A", "B", "C", "D")


class BenchmarkFileError(ValueError):
    """A benchmark file that does not follow the schema; the message names the file and line."""


@dataclass(frozen=True)
class MCQ:
    question: str
    choices: tuple[str, ...]
    answer: int

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("question must be a non-empty string")
        if len(self.choices) < 2 or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError("choices must be a list of at least two non-empty strings")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise ValueError("answer must be an integer index into choices")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} is out of range for {len(self.choices)} choices")

    def to_json(self) -> dict:
        return {"question": self.question, "choices": list(self.choices), "answer": self.answer}

    @classmethod
    def from_json(cls, row: dict) -> MCQ:
        missing = {"question", "choices", "answer"} - set(row)
        if missing:
            raise ValueError(f"missing field(s) {sorted(missing)}")
        if not isinstance(row["choices"], list):  # a string would be split into one-letter choices
            raise ValueError(f"choices must be a JSON list of strings, got {type(row['choices']).__name__} "
                             f"{_short(row['choices'])}")
        return cls(row["question"], tuple(row["choices"]), row["answer"])


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Split:
    """One domain of a benchmark: questions to evaluate on and texts to train on.

    ``answer_starts`` gives, per corpus text, the character where its answer begins (a fact
    statement "The capital of France is Paris." answers from " Paris"); None for raw documents,
    whose every token is answer. Methods with ``loss_tokens: answer`` score only those tokens, as
    TOFU and open-unlearning mask the question."""

    questions: list[MCQ]
    corpus: list[str] = field(default_factory=list)
    answer_starts: list[int] | None = None

    def __post_init__(self):
        if self.answer_starts is not None and len(self.answer_starts) != len(self.corpus):
            raise ValueError(f"{len(self.answer_starts)} answer starts for {len(self.corpus)} "
                             "corpus texts")

    def __len__(self) -> int:
        return len(self.questions)


def question_texts(questions: list[MCQ]) -> list[str]:
    """Without a corpus, train on each question completed by its correct choice."""
    return [f"{q.question} {q.choices[q.answer]}" for q in questions]


def statement_split(questions: list[MCQ], suffix: str = "") -> Split:
    """The questions, trained on as statements (question, space, correct choice, ``suffix``),
    each with the character where its answer begins (the space before the choice)."""
    return Split(questions, [text + suffix for text in question_texts(questions)],
                 answer_starts=[len(q.question) for q in questions])


def jsonl_rows(path: str | Path, what: str = "benchmark file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object raises
    BenchmarkFileError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFileError(f"{what} not found: {path}")
    try:
        f = path.open("rb")
    except OSError as err:
        raise BenchmarkFileError(f"{what} cannot be read: {path} ({err.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BenchmarkFileError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} "
                                         f"at column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise BenchmarkFileError(f"{path}:{lineno}: not valid JSON ({err.msg} at column "
                                         f"{err.colno})") from None
            except RecursionError:
                raise BenchmarkFileError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise BenchmarkFileError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, row


def read_mcq_jsonl(path: str | Path) -> list[MCQ]:
    """Read a WMDP-schema JSONL file; a bad line raises BenchmarkFileError naming file and line."""
    questions = []
    for lineno, row in jsonl_rows(path):
        try:
            questions.append(MCQ.from_json(row))
        except (ValueError, TypeError) as err:
            raise BenchmarkFileError(f"{path}:{lineno}: {err}") from None
    if not questions:
        raise BenchmarkFileError(f"{path}: no questions in file")
    return questions


def write_mcq_jsonl(questions: list[MCQ], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q.to_json()) + "\n")
    tmp.replace(path)
    return path


@dataclass
class Benchmark:
    """What a benchmark config builds: the forget and retain domains and how to score them.

    ``extra_retain`` holds further retain-style evaluations reported beside the main ones (e.g. an
    MMLU subsample next to a fact set); ``inject`` says the model must first be taught the facts
    (only the embedded synthetic benchmark does this, for the tiny model). ``retain_train`` and
    ``retain_fit`` are the retain parts methods may train on and the pipeline may fit to; once the
    run has cut them (mansu.benchmarks.parts), ``retain`` is the scored part only. A builder may
    give its own parts.
    """

    name: str
    forget: Split
    retain: Split
    scoring: str = "cloze"
    extra_retain: dict[str, Split] = field(default_factory=dict)
    inject: bool = False
    retain_train: Split | None = None
    retain_fit: Split | None = None
    general_text: list[str] = field(default_factory=list)  # NLL only: no step trains on it

    def all_texts(self) -> list[str]:
        parts = [self.retain, self.retain_train, self.retain_fit]
        return self.forget.corpus + [text for part in parts if part is not None
                                     for text in part.corpus]
