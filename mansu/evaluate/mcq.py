"""Multiple-choice accuracy, scored exactly as lm-eval 0.4.13 scores it, with bootstrap intervals.

A question becomes one (context, continuation) request per choice, and a choice's score is the
summed log-likelihood of its continuation tokens (lm-eval's ``acc``). Everything that decides a
score follows lm-eval's HFLM for causal models: the prompt text, ``_encode_pair`` tokenisation
(trailing spaces of the context move to the continuation; BOS is whatever the tokenizer adds),
left truncation to the model's context length, and the positions whose logits are read. So the
predictions are lm-eval's; ``tests/evaluate/test_evaluation.py`` checks that one question at a time.

What differs is only how the work is batched:
- requests whose model input is the same token sequence share one forward row (lm-eval's
  ``logits_cache`` grouping); in ``letter`` scoring the four one-token letters share the prompt,
  so each question costs one row, and a letter that is several tokens falls back to rows of
  its own, as in lm-eval;
- rows are right-padded with an attention mask (a causal model's real tokens never see right
  padding) and sorted by length so that little padding is computed;
- the vocabulary projection runs only at the positions that are scored (``logits_to_keep``).
Log-softmax runs in float32 whatever the model's dtype (lm-eval's default keeps the model's;
``mansu.evaluate.lm_eval_tasks`` runs lm-eval with ``softmax_dtype=float32`` to match). In float32 the
scores equal lm-eval's to ~1e-6; in bf16, rounding depends on batch shapes, so scores agree to
~0.05 and a near-tie can go either way in either program.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mansu.data import LETTERS, MCQ
from mansu.stats import bootstrap_interval

SCORINGS = ("cloze", "letter")

# lm-eval's fallbacks when neither the model config nor the tokenizer names a context length.
_DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656


@dataclass
class MCQResult:
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    correct: list[bool]
    predictions: list[int]

    def to_json(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
        }


def mcq_requests(question: MCQ, scoring: str) -> tuple[str, list[str]]:
    """The context and the per-choice continuations lm-eval scores for one question."""
    if scoring == "cloze":
        return question.question, [" " + choice for choice in question.choices]
    if scoring == "letter":
        if len(question.choices) > len(LETTERS):
            raise ValueError(f"letter scoring supports at most {len(LETTERS)} choices")
        letters = LETTERS[: len(question.choices)]
        options = "".join(f"\n{letter}. {c}" for letter, c in zip(letters, question.choices))
        return f"{question.question}{options}\nAnswer:", [" " + letter for letter in letters]
    raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``_encode_pair`` for causal models, with the tokenizer called once per batch.

    The continuation is the tail of enc(context + continuation) after as many tokens as
    enc(context) has, so a merge across the boundary is scored the way lm-eval scores it.
    """
    split = [_move_trailing_space(context, continuation) for context, continuation in pairs]
    ids = _tokenize(tokenizer, [c for c, _ in split] + [c + cont for c, cont in split])
    encoded = []
    for context, continuation in split:
        context_ids = ids[context]
        continuation_ids = ids[context + continuation][len(context_ids) :]
        if not continuation_ids:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        encoded.append((context_ids, continuation_ids))
    return encoded


def choice_logprobs(
    model, tokenizer, questions: Sequence[MCQ], *, scoring: str, batch_size: int = 32
) -> torch.Tensor:
    """[n_questions, max_choices] summed log-likelihood of each choice's continuation.

    Questions with fewer choices than the widest one are padded with -inf.
    """
    if not questions:
        raise ValueError("no questions to score")
    prompts = [mcq_requests(q, scoring) for q in questions]
    pairs = [(context, cont) for context, conts in prompts for cont in conts]
    encoded = encode_pairs(tokenizer, pairs)

    max_length = _max_length(model, tokenizer)
    rows: dict[tuple[int, ...], int] = {}  # model input -> row index
    request_rows, request_tokens = [], []
    for context_ids, continuation_ids in encoded:
        if len(continuation_ids) > max_length:
            raise ValueError(f"a continuation of {len(continuation_ids)} tokens exceeds the "
                             f"model's context of {max_length}")
        model_input = tuple((context_ids + continuation_ids)[-(max_length + 1) :][:-1])
        request_rows.append(rows.setdefault(model_input, len(rows)))
        request_tokens.append(continuation_ids)

    scores = _score_requests(model, tokenizer, list(rows), request_rows, request_tokens, batch_size)

    width = max(len(q.choices) for q in questions)
    table = torch.full((len(questions), width), float("-inf"))
    start = 0
    for i, q in enumerate(questions):
        table[i, : len(q.choices)] = scores[start : start + len(q.choices)]
        start += len(q.choices)
    return table


def evaluate_mcq(
    model,
    tokenizer,
    questions: Sequence[MCQ],
    *,
    scoring: str = "cloze",
    batch_size: int = 32,
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> MCQResult:
    """Accuracy of the highest-scoring choice (first one on ties, as lm-eval's np.argmax)."""
    logprobs = choice_logprobs(model, tokenizer, questions, scoring=scoring, batch_size=batch_size)
    predictions = logprobs.argmax(dim=1).tolist()
    correct = [p == q.answer for p, q in zip(predictions, questions)]
    ci_low, ci_high = bootstrap_interval(correct, iters=bootstrap_iters, seed=seed)
    return MCQResult(
        accuracy=float(np.mean(correct)),
        ci_low=ci_low,
        ci_high=ci_high,
        n=len(questions),
        correct=correct,
        predictions=predictions,
    )


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    # lm-eval moves the context's trailing whitespace into the continuation (word-boundary tokens).
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def _tokenize(tokenizer, texts: list[str]) -> dict[str, list[int]]:
    """HFLM.tok_encode for many texts: special tokens as the tokenizer adds them, except that a
    text already starting with the BOS (or, without one, EOS) string gets none added."""
    unique = list(dict.fromkeys(texts))
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
        tokenizer.eos_token_id)
    prefix = tokenizer.decode(prefix_id) if prefix_id is not None else None
    prefixed = [t for t in unique if prefix is not None and t.startswith(prefix)]
    plain = [t for t in unique if not (prefix is not None and t.startswith(prefix))]
    ids = {}
    if plain:
        ids.update(zip(plain, tokenizer(plain)["input_ids"]))
    if prefixed:
        ids.update(zip(prefixed, tokenizer(prefixed, add_special_tokens=False)["input_ids"]))
    return ids


def _max_length(model, tokenizer) -> int:
    # lm-eval's resolve_max_length: the model config first, then the tokenizer, then 2048.
    config = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if model_max_length is not None and model_max_length != _TOKENIZER_INFINITY:
        return int(model_max_length)
    return _DEFAULT_MAX_LENGTH


def _score_requests(
    model,
    tokenizer,
    rows: list[tuple[int, ...]],
    request_rows: list[int],
    request_tokens: list[list[int]],
    batch_size: int,
) -> torch.Tensor:
    """Summed log-probabilities of each request's tokens at the end of its row's input."""
    # A row's logits are needed at its last k positions, k = its longest continuation.
    kept = [0] * len(rows)
    requests_of_row: list[list[int]] = [[] for _ in rows]
    for request, row in enumerate(request_rows):
        kept[row] = max(kept[row], len(request_tokens[request]))
        requests_of_row[row].append(request)

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Scores stay on the device until the end: no per-batch synchronisation, so the host
    # prepares the next batch while the device computes this one.
    scores = torch.zeros(len(request_rows), dtype=torch.float32, device=device)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="scoring", leave=False,
                              disable=True if len(batches) < 2 else None):
                inputs = _pack_rows([rows[r] for r in batch], [kept[r] for r in batch], pad_id)
                logprobs = _kept_logprobs(model, *(t.to(device) for t in inputs),
                                          n_kept=sum(kept[r] for r in batch))
                # logprobs holds the kept positions row after row; find each request's slice.
                flat_index, tokens, owner = [], [], []
                end = 0
                for row in batch:
                    end += kept[row]
                    for request in requests_of_row[row]:
                        n = len(request_tokens[request])
                        flat_index.extend(range(end - n, end))
                        tokens.extend(request_tokens[request])
                        owner.extend([request] * n)
                flat_index, tokens, owner = (torch.tensor(x).to(device)
                                             for x in (flat_index, tokens, owner))
                scores.index_add_(0, owner, logprobs[flat_index, tokens])
    finally:
        model.train(was_training)
    return scores.cpu()


def _pack_rows(
    rows: list[tuple[int, ...]], kept: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and the mask of each row's last kept positions."""
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + (pad_id,) * (width - len(row)) for row in rows])
    lengths = torch.tensor([len(row) for row in rows])[:, None]
    positions = torch.arange(width)[None, :]
    attention_mask = positions < lengths
    keep = attention_mask & (positions >= lengths - torch.tensor(kept)[:, None])
    return input_ids, attention_mask.long(), keep


def _kept_logprobs(model, input_ids, attention_mask, keep, *, n_kept: int) -> torch.Tensor:
    """float32 log-softmax at the positions marked in ``keep``, flattened row by row."""
    if _accepts_logits_to_keep(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                       use_cache=False).logits
        if logits.dim() != 2 or logits.shape[0] != n_kept:
            raise RuntimeError(f"{type(model).__name__} does not honour a boolean logits_to_keep "
                               f"mask (got logits of shape {tuple(logits.shape)})")
    else:  # e.g. a wrapper whose forward hides its keywords: compute all logits, then select
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits[keep]
    return torch.log_softmax(logits.float(), dim=-1)


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters
