"""The retain parts (mansu.benchmarks.parts): train / fit / eval disjoint, refused when they
overlap, counted and fingerprinted in the record; a run whose method could read a scored retain
fact fails before any model is loaded."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, mansu_cli

from mansu.benchmarks import real_facts
from mansu.benchmarks.parts import cut, fingerprints, with_retain_parts
from mansu.data import MCQ, Benchmark, BenchmarkFileError, Split, statement_split

QUESTIONS = [MCQ(f"The river of town {i} is the", (f"R{i}", "X", "Y", "Z"), 0) for i in range(20)]


def facts(questions=QUESTIONS) -> Benchmark:
    return Benchmark("toy", statement_split(QUESTIONS[:4]), statement_split(list(questions)))


def test_cut_is_disjoint_seeded_and_keeps_statements_with_their_questions():
    parts = cut(statement_split(QUESTIONS), train=0.4, fit=0.2, seed=0)
    assert [len(parts[k].questions) for k in ("train", "fit", "eval")] == [8, 4, 8]
    assert cut(statement_split(QUESTIONS), train=0.4, fit=0.2, seed=0) == parts
    seen = [q for part in parts.values() for q in part.questions]
    assert sorted(seen, key=QUESTIONS.index) == QUESTIONS
    for part in parts.values():
        assert [text.startswith(q.question) for text, q in zip(part.corpus, part.questions)]
        assert len(part.corpus) == len(part.questions) == len(part.answer_starts)


def test_a_corpus_of_its_own_is_train_text_only():
    split = Split(QUESTIONS, ["Rivers run to the sea."] * 3)
    parts = cut(split, train=0.4, fit=0.2, seed=0)
    assert len(parts["train"].corpus) == 3 and parts["fit"].corpus == parts["eval"].corpus == []


def test_the_scored_part_is_the_retain_split_and_the_record_counts_each_part():
    benchmark = with_retain_parts(facts(), train=0.4, fit=0.2, seed=0, min_eval=5)
    assert len(benchmark.retain.questions) == 8
    counts = fingerprints(benchmark)
    assert {k: v["questions"] for k, v in counts.items()} == {
        "forget": 4, "retain_train": 8, "retain_fit": 4, "retain_eval": 8}
    assert len({v["fingerprint"] for v in counts.values()}) == 4


def test_overlapping_parts_are_refused_naming_the_question():
    benchmark = facts()
    overlapping = Benchmark("toy", benchmark.forget, statement_split(QUESTIONS[:10]),
                            retain_train=statement_split(QUESTIONS[8:14]),
                            retain_fit=statement_split(QUESTIONS[14:]))
    with pytest.raises(BenchmarkFileError, match=r"retain train and eval parts share 2 "
                                                 r"question\(s\), e.g. 'the river of town 8"):
        with_retain_parts(overlapping, train=0.4, fit=0.2, seed=0, min_eval=1)


def test_a_train_text_stating_a_scored_fact_is_refused():
    leaky = Split(QUESTIONS[:10], ["Notes: the river of town 15 is the R15, they say."])
    benchmark = Benchmark("toy", facts().forget, statement_split(QUESTIONS[14:]),
                          retain_train=leaky, retain_fit=statement_split(QUESTIONS[10:14]))
    with pytest.raises(BenchmarkFileError, match=r"a retain train text states the eval fact "
                                                 r"'The river of town 15 is the R15'"):
        with_retain_parts(benchmark, train=0.4, fit=0.2, seed=0, min_eval=1)


def test_an_eval_part_too_small_for_its_interval_is_refused():
    with pytest.raises(BenchmarkFileError, match=r"retain eval part has 8 questions, fewer than "
                                                 r"eval.min_retain_eval=60"):
        with_retain_parts(facts(), train=0.4, fit=0.2, seed=0, min_eval=60)
    with pytest.raises(ValueError, match=r"eval.retain_train \(0.6\) and eval.retain_fit \(0.4\)"):
        with_retain_parts(facts(), train=0.6, fit=0.4, seed=0, min_eval=1)


def test_real_facts_score_one_half_and_train_and_fit_on_the_other():
    test = with_retain_parts(real_facts.build(split="test", mmlu_size=0), train=0.4, fit=0.2,
                             seed=0, min_eval=60)
    dev = real_facts.build(split="dev", mmlu_size=0)
    assert len(test.retain.questions) == 67
    assert set(test.retain_train.questions) | set(test.retain_fit.questions) == set(
        dev.retain.questions)
    assert len(test.retain_train.questions) == 45 and len(test.retain_fit.questions) == 23


def test_a_run_whose_method_could_read_a_scored_retain_fact_fails_before_loading(tmp_path):
    rows = [{"question": q.question, "choices": list(q.choices), "answer": q.answer}
            for q in QUESTIONS]
    for name, subset in (("forget", rows[:4]), ("retain", rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in subset))
    # a retain corpus of its own (its texts are not the questions' statements, line for line)
    # that states every retain fact, the scored ones among them
    (tmp_path / "corpus.jsonl").write_text("".join(
        json.dumps({"text": f"{r['question']} {r['choices'][0]}."}) + "\n" for r in rows[::-1]))
    tiny = [o for o in TINY if not o.startswith("benchmark.")]
    out = mansu_cli([*tiny, "benchmark=local_jsonl", f"benchmark.forget_path={tmp_path}/forget.jsonl",
                     f"benchmark.retain_path={tmp_path}/retain.jsonl",
                     f"benchmark.retain_corpus_path={tmp_path}/corpus.jsonl",
                     "hydra.run.dir=" + str(tmp_path / "run")], tmp_path / "outputs", timeout=300)
    assert out.returncode == 1
    assert "a retain train text states the eval fact" in out.stderr
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed"
    assert "a retain train text states the eval fact" in record["error"]
    assert "accuracy" not in record.get("metrics", {})  # failed in the load stage, before θ0
