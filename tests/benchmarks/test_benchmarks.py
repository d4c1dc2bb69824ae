"""The embedded synthetic benchmark and the local JSONL loader, built through their configs."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config
from hydra.utils import instantiate

from mansu.benchmarks.synthetic import DOMAINS, FORGET_DOMAIN, build
from mansu.data import MCQ, BenchmarkFileError, read_mcq_jsonl, write_mcq_jsonl


def test_default_synthetic_sizes_make_one_question_at_most_half_a_point():
    bench = instantiate(compose_config(["benchmark.forget_entities=70",
                                        "benchmark.retain_entities_per_domain=70"]).benchmark)
    assert len(bench.forget) >= 200 and len(bench.retain) >= 400
    assert bench.scoring == "cloze" and bench.inject
    assert len(bench.forget.corpus) == len(bench.forget) and len(bench.retain.corpus) == len(bench.retain)


def test_synthetic_is_seeded_and_domains_share_no_entity_or_attribute():
    a, b = build(seed=7), build(seed=7)
    assert [q.to_json() for q in a.forget.questions] == [q.to_json() for q in b.forget.questions]
    assert build(seed=8).forget.corpus != a.forget.corpus

    def names(split, template):
        prefix, suffix = template.split("{name}")
        return {q.question[len(prefix):].split(suffix)[0] if suffix.strip() else
                q.question[len(prefix):].split(" ")[0] for q in split.questions}

    forget_names = names(a.forget, DOMAINS[FORGET_DOMAIN][0])
    retain_names = {q.question.split()[3] for q in a.retain.questions
                    if q.question.startswith("The city of")}
    retain_names |= {q.question.split()[2] for q in a.retain.questions
                     if not q.question.startswith("The city of")}
    assert forget_names and retain_names and not forget_names & retain_names
    forget_attrs = {c for q in a.forget.questions for c in q.choices}
    retain_attrs = {c for q in a.retain.questions for c in q.choices}
    assert not forget_attrs & retain_attrs


def test_each_question_is_its_statement_without_the_answer():
    bench = build(seed=3, forget_entities=5, retain_entities_per_domain=2)
    for q, text in zip(bench.forget.questions, bench.forget.corpus):
        assert text == f"{q.question} {q.choices[q.answer]}."
        assert len(q.choices) == 4 and len(set(q.choices)) == 4


def test_unknown_retain_domain_is_named():
    with pytest.raises(ValueError, match="unknown retain domain.*chemistry"):
        build(retain_domains=["chemistry"])


def test_local_jsonl_roundtrip_through_its_config(tmp_path):
    forget = [MCQ("Q1?", ("a", "b", "c", "d"), 2), MCQ("Q2?", ("e", "f", "g", "h"), 0)]
    retain = [MCQ("R1?", ("i", "j", "k", "l"), 3)]
    write_mcq_jsonl(forget, tmp_path / "f.jsonl")
    write_mcq_jsonl(retain, tmp_path / "r.jsonl")
    (tmp_path / "fc.jsonl").write_text(json.dumps({"text": "forget text"}) + "\n")
    cfg = compose_config(["benchmark=local_jsonl", f"benchmark.forget_path={tmp_path}/f.jsonl",
                          f"benchmark.retain_path={tmp_path}/r.jsonl",
                          f"benchmark.forget_corpus_path={tmp_path}/fc.jsonl"])
    bench = instantiate(cfg.benchmark)
    assert bench.forget.questions == forget and bench.retain.questions == retain
    assert bench.forget.corpus == ["forget text"] and bench.retain.corpus == ["R1? l"]


@pytest.mark.parametrize("line,problem", [
    ('{"question": "Q", "choices": ["a", "b"], "answer": 5}', "out of range"),
    ('{"question": "Q", "choices": ["a", "b"]}', "missing field"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": 0', "Expecting"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_malformed_line_is_named_with_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    good = '{"question": "Q", "choices": ["a", "b"], "answer": 1}'
    path.write_text(f"{good}\n{good}\n{line}\n")
    with pytest.raises(BenchmarkFileError, match=rf"bad\.jsonl:3: .*{problem}"):
        read_mcq_jsonl(path)


def test_missing_benchmark_file_is_named(tmp_path):
    with pytest.raises(BenchmarkFileError, match="not found"):
        read_mcq_jsonl(tmp_path / "nope.jsonl")
