"""mansu.evaluate.mcq against lm-eval 0.4.13 and against a naive one-request-at-a-time computation."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONFIGS, build, make_tokenizer, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mansu.data import MCQ
from mansu.evaluate.mcq import (
    _length_batches,
    _max_length,
    choice_logprobs,
    encode_pairs,
    evaluate_mcq,
    mcq_requests,
)
from mansu.stats import bootstrap_interval

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = (
    "the", "virus", "bacterium", "toxin", "spreads", "through", "water", "air", "ticks",
    "mosquitoes", "cells", "river", "mountain", "city", "of", "is", "carried", "by", "found", "in",
    "known", "for", "which", "what", "where", "does", "protein", "gene", "enzyme", "blood"
)


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _questions(n: int, seed: int = 0) -> list[MCQ]:
    """Questions of very different lengths with multi-token choices of different lengths; a few
    end in a space (lm-eval moves it into the continuation) and one starts with the BOS text."""
    rng = random.Random(seed)
    questions = []
    for i in range(n):
        question = _sentence(rng, 2, 40).capitalize() + "?"
        if i % 7 == 3:
            question += " "
        if i == 5:
            question = "<s>" + question
        choices = tuple(_sentence(rng, 1, 5) for _ in range(4))
        questions.append(MCQ(question, choices, rng.randrange(4)))
    return questions


def _tokenizer(*, vocab_size: int, add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here; add_bos=False behaves like GPT-2 (no BOS, EOS as prefix)."""
    rng = random.Random(1)
    corpus = [_sentence(rng, 4, 14).capitalize() + "." for _ in range(400)]
    corpus += [f"Answer: {letter}" for letter in "ABCD"] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                       eos_token="</s>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer(vocab_size=400, add_bos=True)


@pytest.fixture(scope="module")
def model():
    # A large initializer range makes the random model opinionated: scores differ by more than
    # float noise, so a prediction is decided by the computation, not by rounding.
    return tiny_llama(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      max_position_embeddings=256, initializer_range=0.2).eval()


@pytest.fixture(scope="module")
def questions():
    return _questions(40)


@pytest.fixture(scope="module")
def lm_eval_results(model, tokenizer, questions, tmp_path_factory):
    """lm-eval's results for both scorings (imported once: the import is slow)."""
    from mansu.evaluate.lm_eval_tasks import lm_eval_accuracy, write_local_task

    task_dir = tmp_path_factory.mktemp("lm_eval_tasks")
    results = {}
    for scoring in ("cloze", "letter"):
        write_local_task(questions, task_dir, f"mansu_test_{scoring}", scoring)
        results[scoring] = lm_eval_accuracy(model, tokenizer, task_dir, f"mansu_test_{scoring}",
                                            batch_size=8)
    return results


def _pairs(questions, scoring: str) -> list[tuple[str, str]]:
    """Every (context, continuation) request of the questions, question by question."""
    return [(context, continuation) for q in questions
            for context, continuations in [mcq_requests(q, scoring)]
            for continuation in continuations]


def _naive_logprob(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """One unpadded forward of context + continuation, full log-softmax, summed."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1)
    return sum(logprobs[p, t].item() for p, t in zip(positions, continuation_ids))


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("scoring", ["cloze", "letter"])
def test_tokenisation_is_lm_evals(questions, scoring, add_bos):
    from lm_eval.models.huggingface import HFLM

    tokenizer = _tokenizer(vocab_size=400, add_bos=add_bos)
    config = LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)
    lm = HFLM(pretrained=LlamaForCausalLM(config), tokenizer=tokenizer, batch_size=1)
    pairs = _pairs(questions, scoring)
    assert encode_pairs(tokenizer, pairs) == [lm._encode_pair(ctx, cont) for ctx, cont in pairs]


@pytest.mark.parametrize("scoring", ["cloze", "letter"])
def test_predictions_equal_lm_evals_one_by_one(model, tokenizer, questions, lm_eval_results,
                                               scoring):
    reference = lm_eval_results[scoring]
    result = evaluate_mcq(model, tokenizer, questions, scoring=scoring, batch_size=8)
    assert reference["n"] == result.n == len(questions)
    assert result.predictions == reference["predictions"]
    assert result.accuracy == reference["accuracy"]
    ours = choice_logprobs(model, tokenizer, questions, scoring=scoring, batch_size=8)
    torch.testing.assert_close(ours, torch.tensor(reference["loglikelihoods"]), rtol=0, atol=1e-4)
    # Not a degenerate comparison: the random model does not always pick the same option.
    assert len(set(result.predictions)) > 1


def test_full_rows_equal_lm_evals(model, tokenizer, questions, lm_eval_results):
    """The full-row path (prefix_cache=False) stays lm-eval's too, cloze and letter."""
    for scoring in ("cloze", "letter"):
        reference = lm_eval_results[scoring]
        result = evaluate_mcq(model, tokenizer, questions, scoring=scoring, batch_size=8,
                              prefix_cache=False)
        assert result.predictions == reference["predictions"]
        ours = choice_logprobs(model, tokenizer, questions, scoring=scoring, batch_size=8,
                               prefix_cache=False)
        torch.testing.assert_close(ours, torch.tensor(reference["loglikelihoods"]), rtol=0,
                                   atol=1e-4)


def test_lm_eval_task_prompts_are_ours(questions, tmp_path):
    """The YAML's prompts render to mcq_requests' strings (checked through lm-eval itself)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from mansu.evaluate.lm_eval_tasks import write_local_task

    for scoring in ("cloze", "letter"):
        write_local_task(questions, tmp_path, f"prompts_{scoring}", scoring)
        manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
        task = get_task_dict([f"prompts_{scoring}"], manager)[f"prompts_{scoring}"]
        for doc, question in zip(task.test_docs(), questions):
            context, continuations = mcq_requests(question, scoring)
            assert task.fewshot_context(doc, num_fewshot=0) == context
            assert [" " + c for c in task.doc_to_choice(doc)] == continuations


def test_cloze_batched_equals_naive(model, tokenizer, questions):
    questions = questions[:20]
    batched = choice_logprobs(model, tokenizer, questions, scoring="cloze", batch_size=8)
    naive = torch.tensor([
        [_naive_logprob(model, *encode_pairs(tokenizer, [(q.question, " " + c)])[0])
         for c in q.choices]
        for q in questions
    ])
    torch.testing.assert_close(batched, naive, rtol=0, atol=1e-4)


def test_letter_reads_all_letters_from_one_row_per_question(model, tokenizer, questions):
    rows_seen = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: rows_seen.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        choice_logprobs(model, tokenizer, questions, scoring="letter", batch_size=16)
    finally:
        hook.remove()
    assert rows_seen == [16, 16, 8]


def test_letter_padding_does_not_change_scores(model, tokenizer):
    short = MCQ("Virus?", ("ticks", "water", "air", "blood"), 0)
    long = MCQ(" ".join(["the virus is carried by ticks"] * 12) + "?", short.choices, 1)
    questions = [short, long, short]
    batched = choice_logprobs(model, tokenizer, questions, scoring="letter", batch_size=3)
    one_by_one = torch.cat([choice_logprobs(model, tokenizer, [q], scoring="letter", batch_size=1)
                            for q in questions])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-5)
    for row, q in zip(batched, questions):
        context, letters = mcq_requests(q, "letter")
        naive = [_naive_logprob(model, *encode_pairs(tokenizer, [(context, c)])[0])
                 for c in letters]
        torch.testing.assert_close(row, torch.tensor(naive), rtol=0, atol=1e-5)


def _lm_eval_loglikelihoods(model, tokenizer, questions, scoring: str) -> torch.Tensor:
    """lm-eval's HFLM scores for the same requests, without building a task around them."""
    from lm_eval.models.huggingface import HFLM

    pairs = _pairs(questions, scoring)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, softmax_dtype=torch.float32)
    scores = lm.loglikelihood([SimpleNamespace(args=pair) for pair in pairs], disable_tqdm=True)
    # [n_questions, max_choices], -inf past a question's choices (as choice_logprobs pads).
    table = torch.full((len(questions), max(len(q.choices) for q in questions)), float("-inf"))
    flat = iter(ll for ll, _ in scores)
    for row, q in zip(table, questions):
        row[: len(q.choices)] = torch.tensor([next(flat) for _ in q.choices])
    return table


def test_long_prompts_and_several_token_letters_score_as_in_lm_eval(model, questions):
    """Without merges every letter is two tokens (" " and the letter), so the four letters share
    no row; and the longest prompts exceed the model's 256 positions, so they are truncated."""
    tokenizer = _tokenizer(vocab_size=259, add_bos=True)
    pairs = _pairs(questions, "letter")
    encoded = encode_pairs(tokenizer, pairs)
    assert all(len(cont) == 2 for _, cont in encoded)
    assert max(len(ctx) + len(cont) for ctx, cont in encoded) > 256 + 1

    scores = choice_logprobs(model, tokenizer, questions, scoring="letter", batch_size=16)
    reference = _lm_eval_loglikelihoods(model, tokenizer, questions, "letter")
    torch.testing.assert_close(scores, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scoring", ["cloze", "letter"])
def test_nf4_quantized_model_scores_as_in_lm_eval(model, tokenizer, questions, scoring):
    from mansu.quantize.quantizer import quantize_model

    quantized = quantize_model(model, quant_type="nf4", blocksize=64)
    scores = choice_logprobs(quantized, tokenizer, questions, scoring=scoring, batch_size=16)
    reference = _lm_eval_loglikelihoods(quantized, tokenizer, questions, scoring)
    torch.testing.assert_close(scores, reference, rtol=0, atol=1e-4)
    assert not torch.allclose(scores, choice_logprobs(model, tokenizer, questions,
                                                      scoring=scoring, batch_size=16))


def test_bf16_model_scores_in_float32_close_to_lm_eval(model, tokenizer, questions):
    """bf16 rounding depends on batch shapes, so only closeness is exact enough to assert."""
    bf16 = LlamaForCausalLM(model.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(model.state_dict())
    scores = choice_logprobs(bf16, tokenizer, questions, scoring="cloze", batch_size=16)
    reference = _lm_eval_loglikelihoods(bf16, tokenizer, questions, "cloze")
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference, rtol=0, atol=0.2)
    agree = (scores.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.9


# The prefix cache against the full rows: the same function of the same tokens in other matrix
# shapes, so float32 rounding alone. Measured (max |difference|): this module's model 7.6e-6
# (vs lm-eval 7.6e-6, the full rows 1.1e-5); the truncating byte-level tokenizer, whose sums
# reach -313 (float32 ulp 3.1e-5 there), 6.1e-5 = 2 ulps (vs lm-eval 4.6e-5, the full rows
# 6.1e-5); the family models 0 to 2.3e-5. The assertions allow 1e-4 and require equal
# predictions.
PREFIX_ATOL = 1e-4


def _varied_questions(n: int, max_choices: int, seed: int = 2) -> list[MCQ]:
    """Questions of 1-40 words with 2..max_choices choices of 1-6 words each."""
    rng = random.Random(seed)
    questions = []
    for _ in range(n):
        choices = tuple(_sentence(rng, 1, 6) for _ in range(rng.randint(2, max_choices)))
        questions.append(MCQ(_sentence(rng, 1, 40).capitalize() + "?", choices,
                             rng.randrange(len(choices))))
    return questions


def _traced_logprobs(model, *args, hooked=None, **kwargs):
    """choice_logprobs(model, ...) and, for every forward of ``hooked`` (default: ``model``)
    during it, (rows, whether the rows continue a cached prefix)."""
    calls = []

    def record(module, args, kw):
        cache = kw.get("cache")
        calls.append((kw["input_ids"].shape[0], cache is not None and cache.get_seq_length() > 0))

    hook = (hooked or model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        return choice_logprobs(model, *args, **kwargs), calls
    finally:
        hook.remove()


def _assert_same_scores(cached: torch.Tensor, full: torch.Tensor) -> None:
    assert torch.equal(cached.isinf(), full.isinf())  # the -inf padding of short questions
    torch.testing.assert_close(cached, full, rtol=0, atol=PREFIX_ATOL)
    assert torch.equal(cached.argmax(1), full.argmax(1))


@pytest.mark.parametrize("batch_size", [3, 64])
def test_prefix_cache_cloze_equals_full_rows(model, tokenizer, batch_size):
    questions = _varied_questions(30, max_choices=6)
    assert {len(q.choices) for q in questions} == {2, 3, 4, 5, 6}
    cached, calls = _traced_logprobs(model, tokenizer, questions, scoring="cloze",
                                     batch_size=batch_size)
    full = choice_logprobs(model, tokenizer, questions, scoring="cloze", batch_size=batch_size,
                           prefix_cache=False)
    _assert_same_scores(cached, full)
    # Each question runs once (at most batch_size questions a pass), then every choice of more
    # than one token runs its tokens but the last against the question's cache.
    question_passes = [rows for rows, on_prefix in calls if not on_prefix]
    assert sum(question_passes) == len(questions) and max(question_passes) <= batch_size
    assert max(rows for rows, _ in calls) <= batch_size
    encoded = encode_pairs(tokenizer, _pairs(questions, "cloze"))
    assert sum(rows for rows, on_prefix in calls if on_prefix) == len(
        {(tuple(ctx), tuple(cont[:-1])) for ctx, cont in encoded if len(cont) > 1}) > 0


def test_prefix_cache_letter_is_the_one_row_per_question(model, tokenizer):
    """Letter scoring's one-token letters share the prompt row: no cache, the same numbers."""
    questions = _varied_questions(30, max_choices=4, seed=3)
    cached, calls = _traced_logprobs(model, tokenizer, questions, scoring="letter",
                                     batch_size=7)
    full = choice_logprobs(model, tokenizer, questions, scoring="letter", batch_size=7,
                           prefix_cache=False)
    assert torch.equal(cached, full)
    assert calls == [(7, False)] * 4 + [(2, False)]


def test_prefix_cache_with_truncated_contexts_scores_as_in_lm_eval(model):
    """Without merges the longest cloze requests exceed the model's 256 positions: lm-eval
    truncates them from the left, so they keep their full rows and the others take the cache."""
    tokenizer = _tokenizer(vocab_size=259, add_bos=True)
    questions = _varied_questions(40, max_choices=6, seed=5)
    encoded = encode_pairs(tokenizer, _pairs(questions, "cloze"))
    limit = _max_length(model, tokenizer) + 1
    assert any(len(ctx) + len(cont) > limit for ctx, cont in encoded)
    assert sum(len(ctx) + len(cont) <= limit for ctx, cont in encoded) > len(encoded) / 2

    cached, calls = _traced_logprobs(model, tokenizer, questions, scoring="cloze",
                                     batch_size=16)
    assert {on_prefix for _, on_prefix in calls} == {True, False}
    reference = _lm_eval_loglikelihoods(model, tokenizer, questions, "cloze")
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-4)
    assert torch.equal(cached.argmax(1), reference.argmax(1))
    full = choice_logprobs(model, tokenizer, questions, scoring="cloze", batch_size=16,
                           prefix_cache=False)
    _assert_same_scores(cached, full)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_prefix_cache_equals_full_rows_in_every_family(family):
    """Rotary and absolute positions, grouped and single KV heads; Mistral's sliding-window
    cache is not a plain one, so it keeps the full rows."""
    model = build(family, 0.2)
    tokenizer = make_tokenizer(add_bos=True)
    questions = _varied_questions(16, max_choices=5, seed=4)
    cached, calls = _traced_logprobs(model, tokenizer, questions, scoring="cloze",
                                     batch_size=5)
    full = choice_logprobs(model, tokenizer, questions, scoring="cloze", batch_size=5,
                           prefix_cache=False)
    _assert_same_scores(cached, full)
    assert any(on_prefix for _, on_prefix in calls) == (family != "mistral")


def test_prefix_cache_batches_end_before_much_shorter_rows():
    lengths = [40, 35, 31, 29, 12, 11, 10, 3]
    assert _length_batches(list(range(8)), lengths, 3, 3 / 4) == [[0, 1, 2], [3], [4, 5, 6], [7]]
    assert _length_batches(list(range(8)), lengths, 3, 0) == [[0, 1, 2], [3, 4, 5], [6, 7]]


class _Hidden(torch.nn.Module):
    """A wrapper whose forward hides the model's keywords (no cache, no logits_to_keep)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_prefix_cache_skips_a_model_that_takes_no_cache(model, tokenizer, questions):
    wrapped = _Hidden(model)
    cached, calls = _traced_logprobs(wrapped, tokenizer, questions, scoring="cloze",
                                     batch_size=8, hooked=model)
    assert calls and not any(on_prefix for _, on_prefix in calls)
    full = choice_logprobs(model, tokenizer, questions, scoring="cloze", batch_size=8,
                           prefix_cache=False)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_evaluate_restores_train_mode_and_reports_json(model, tokenizer, questions):
    model.train()
    try:
        result = evaluate_mcq(model, tokenizer, questions[:8], bootstrap_iters=200)
        assert model.training
    finally:
        model.eval()
    assert result.to_json() == {"accuracy": result.accuracy, "ci_low": result.ci_low,
                                "ci_high": result.ci_high, "n": 8}
    assert result.accuracy == sum(result.correct) / 8


def test_bootstrap_interval():
    correct = [True] * 60 + [False] * 40
    low, high = bootstrap_interval(correct, iters=2000, seed=3)
    assert (low, high) == bootstrap_interval(correct, iters=2000, seed=3)
    assert low < 0.6 < high
    # Normal approximation: 0.6 +- 1.96 * sqrt(0.6 * 0.4 / 100) = [0.504, 0.696].
    assert low == pytest.approx(0.504, abs=0.02) and high == pytest.approx(0.696, abs=0.02)
    assert bootstrap_interval([True] * 30, iters=100) == (1.0, 1.0)
    assert bootstrap_interval([False] * 30, iters=100) == (0.0, 0.0)


def test_perfect_accuracy_has_a_point_interval(model, tokenizer, questions):
    predicted = evaluate_mcq(model, tokenizer, questions[:10]).predictions
    relabelled = [MCQ(q.question, q.choices, p) for q, p in zip(questions[:10], predicted)]
    result = evaluate_mcq(model, tokenizer, relabelled, seed=7)
    assert (result.accuracy, result.ci_low, result.ci_high) == (1.0, 1.0, 1.0)
    assert np.all(result.correct)
