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
- the prefix cache (``prefix_cache=True``, the default): a context that starts two or more
  distinct rows (cloze: every choice repeats the question) runs once with ``use_cache``, and
  each continuation then runs against a copy of its context's keys and values; the first
  continuation token is read from the context pass's last logits, the others from the
  continuation pass. A 4-choice cloze question thus costs one pass over the question instead
  of four. The causal model computes the same function of the same tokens (same positions,
  same attended tokens), only in other matrix shapes, so scores move by float rounding alone:
  in float32 a few ulps of the summed score (at most 6.1e-5, two ulps, in the tests, and no
  farther from lm-eval's than the full rows are);
- rows are right-padded with an attention mask (a causal model's real tokens never see right
  padding; in the continuation pass the context's padding sits in the middle and is masked,
  and position ids continue from each row's own context length) and sorted by length so that
  little padding is computed (a prefix-cache batch also ends before a much shorter row);
- the vocabulary projection runs only at the positions that are scored (``logits_to_keep``).
The full-row path stays where the prefix cache would not save work or would not compute the
same thing: a context that starts only one distinct row (letter scoring with one-token letters,
where the letters share the prompt row anyway: one pass a question either way), a request lm-eval
truncates at the model's length (its row no longer starts with the whole context), an empty
context, and a model whose forward takes no cache or whose cache is not a plain growing one
(sliding-window or recurrent layers, encoder-decoders, wrappers hiding their keywords);
``prefix_cache=False`` forces the full rows everywhere.
Log-softmax runs in float32 whatever the model's dtype (lm-eval's default keeps the model's;
``mansu.evaluate.lm_eval_tasks`` runs lm-eval with ``softmax_dtype=float32`` to match). In float32 the
scores equal lm-eval's to ~1e-6 per token; in bf16, rounding depends on batch shapes, so scores
agree to ~0.05 on full rows and ~0.1 with the prefix cache (measured on the tests' model), and a
near-tie can go either way in either program.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

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
    model, tokenizer, questions: Sequence[MCQ], *, scoring: str, batch_size: int = 32,
    prefix_cache: bool = True,
) -> torch.Tensor:
    """[n_questions, max_choices] summed log-likelihood of each choice's continuation.

    Questions with fewer choices than the widest one are padded with -inf. ``prefix_cache``: run a
    context shared by several rows once and its continuations against its cached keys and
    values (where that applies, see the module docstring); False: every row in full.
    """
    if not questions:
        raise ValueError("no questions to score")
    prompts = [mcq_requests(q, scoring) for q in questions]
    pairs = [(context, cont) for context, conts in prompts for cont in conts]
    encoded = encode_pairs(tokenizer, pairs)

    max_length = _max_length(model, tokenizer)
    model_inputs = []
    for context_ids, continuation_ids in encoded:
        if len(continuation_ids) > max_length:
            raise ValueError(f"a continuation of {len(continuation_ids)} tokens exceeds the "
                             f"model's context of {max_length}")
        model_inputs.append(tuple((context_ids + continuation_ids)[-(max_length + 1) :][:-1]))

    cached = (_prefix_cached(encoded, model_inputs, max_length)
              if prefix_cache and _cache_keyword(model) else [False] * len(encoded))
    scores = torch.zeros(len(encoded))
    full = [i for i, c in enumerate(cached) if not c]
    if full:
        rows: dict[tuple[int, ...], int] = {}  # model input -> row index
        request_rows = [rows.setdefault(model_inputs[i], len(rows)) for i in full]
        scores[full] = _score_requests(model, tokenizer, list(rows), request_rows,
                                       [encoded[i][1] for i in full], batch_size)
    prefixed = [i for i, c in enumerate(cached) if c]
    if prefixed:
        scores[prefixed] = _score_prefixed(model, tokenizer, [encoded[i] for i in prefixed],
                                           batch_size)

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
    prefix_cache: bool = True,
) -> MCQResult:
    """Accuracy of the highest-scoring choice (first one on ties, as lm-eval's np.argmax)."""
    logprobs = choice_logprobs(model, tokenizer, questions, scoring=scoring, batch_size=batch_size,
                               prefix_cache=prefix_cache)
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
    scores = torch.zeros(len(request_rows), dtype=torch.float32, device=device)

    with _scoring_mode(model):
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
            _add_scores(scores, logprobs, flat_index, tokens, owner)
    return scores.cpu()


def _prefix_cached(encoded: list[tuple[list[int], list[int]]], model_inputs: list[tuple[int, ...]],
                   max_length: int) -> list[bool]:
    """Which requests the prefix cache scores: those lm-eval does not truncate whose context
    starts two or more distinct rows (for one, the full row is that pass without a cache)."""
    fits = [bool(ctx) and len(ctx) + len(cont) <= max_length + 1 for ctx, cont in encoded]
    rows_of_context: dict[tuple[int, ...], set] = {}
    for fit, (ctx, _), row in zip(fits, encoded, model_inputs):
        if fit:
            rows_of_context.setdefault(tuple(ctx), set()).add(row)
    return [fit and len(rows_of_context[tuple(ctx)]) > 1 for fit, (ctx, _) in zip(fits, encoded)]


def _score_prefixed(model, tokenizer, encoded: list[tuple[list[int], list[int]]],
                    batch_size: int) -> torch.Tensor:
    """Summed log-probabilities of (context, continuation) requests: each distinct context runs
    once, caching its keys and values, and gives every continuation's first token; each distinct
    continuation input (all of it but its last token) then runs against a copy of that cache."""
    contexts: dict[tuple[int, ...], list[int]] = {}  # context -> its requests
    inputs: dict[tuple[tuple[int, ...], ...], list[int]] = {}  # (context, input) -> its requests
    for request, (ctx, cont) in enumerate(encoded):
        contexts.setdefault(tuple(ctx), []).append(request)
        if len(cont) > 1:
            inputs.setdefault((tuple(ctx), tuple(cont[:-1])), []).append(request)
    context_rows, requests_of_context = list(contexts), list(contexts.values())
    index_of = {ctx: c for c, ctx in enumerate(context_rows)}
    continuation_rows = [(index_of[ctx], row) for ctx, row in inputs]
    requests_of_row = list(inputs.values())
    rows_of_context: list[list[int]] = [[] for _ in context_rows]
    for row, (c, _) in enumerate(continuation_rows):
        rows_of_context[c].append(row)

    keyword = _cache_keyword(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(context_rows)), key=lambda c: -len(context_rows[c]))
    batches = _length_batches(order, [len(row) for row in context_rows], batch_size, 3 / 4)
    scores = torch.zeros(len(encoded), dtype=torch.float32, device=device)
    with _scoring_mode(model):
        for batch in tqdm(batches, desc="scoring", leave=False,
                          disable=True if len(batches) < 2 else None):
            # Longest continuations first: their padding costs tokens, a context's only attention.
            rows = sorted((row for c in batch for row in rows_of_context[c]),
                          key=lambda row: -len(continuation_rows[row][1]))
            input_ids, attention_mask, keep = (t.to(device) for t in _pack_rows(
                [context_rows[c] for c in batch], [1] * len(batch), pad_id))
            cache = DynamicCache(config=model.config) if rows else None
            forward = {keyword: cache, "use_cache": True} if rows else {}
            logprobs = _kept_logprobs(model, input_ids, attention_mask, keep, n_kept=len(batch),
                                      **forward)
            # Every continuation's first token, from its context's last logits.
            first = [(i, r) for i, c in enumerate(batch) for r in requests_of_context[c]]
            _add_scores(scores, logprobs, [i for i, _ in first],
                        [encoded[r][1][0] for _, r in first], [r for _, r in first])
            position_in_batch = {c: i for i, c in enumerate(batch)}
            # Continuations are short: splitting them finer would cost more passes than tokens.
            for chunk in _length_batches(rows, [len(row) for _, row in continuation_rows],
                                         batch_size, 1 / 2):
                where = [position_in_batch[continuation_rows[row][0]] for row in chunk]
                lengths = [len(context_rows[continuation_rows[row][0]]) for row in chunk]
                _score_continuations(model, keyword, cache, attention_mask, where, lengths,
                                     [continuation_rows[row][1] for row in chunk],
                                     [requests_of_row[row] for row in chunk], encoded, scores,
                                     pad_id)
    return scores.cpu()


def _length_batches(order: list[int], lengths: list[int], batch_size: int,
                    ratio: float) -> list[list[int]]:
    """``order`` (longest first) in batches of at most ``batch_size`` rows, a batch also ending
    before a row shorter than ``ratio`` times its first, so that a few long rows do not pad a
    whole batch (with a quarter of the full rows' rows, a batch spans more lengths)."""
    batches: list[list[int]] = []
    for row in order:
        if (not batches or len(batches[-1]) == batch_size
                or lengths[row] < ratio * lengths[batches[-1][0]]):
            batches.append([])
        batches[-1].append(row)
    return batches


def _score_continuations(model, keyword: str, cache, context_mask: torch.Tensor,
                         where: list[int], lengths: list[int], rows: list[tuple[int, ...]],
                         requests: list[list[int]], encoded, scores: torch.Tensor,
                         pad_id: int) -> None:
    """One pass of continuation inputs ``rows`` after the contexts at ``where`` in the batch
    (``lengths`` tokens each) whose keys and values ``cache`` holds; adds the log-probabilities
    of each request's tokens after the first into ``scores``."""
    device = context_mask.device
    index = torch.tensor(where, device=device)
    width = max(lengths)  # contexts are right-padded: the tail past the longest is padding
    # A copy: the forward appends the continuation's keys and values to the cache it is given.
    copy = DynamicCache(ddp_cache_data=[(layer.keys[index, :, :width],
                                         layer.values[index, :, :width])
                                        for layer in cache.layers])
    input_ids, continuation_mask, keep = (t.to(device) for t in _pack_rows(
        rows, [len(row) for row in rows], pad_id))
    attention_mask = torch.cat([context_mask[index, :width], continuation_mask], dim=1)
    position_ids = (torch.tensor(lengths)[:, None]
                    + torch.arange(input_ids.shape[1])[None, :]).to(device)
    logprobs = _kept_logprobs(model, input_ids, attention_mask, keep,
                              n_kept=sum(len(row) for row in rows), position_ids=position_ids,
                              **{keyword: copy, "use_cache": True})
    flat_index, tokens, owner = [], [], []
    end = 0
    for row, row_requests in zip(rows, requests):
        for request in row_requests:  # the row is the request's continuation but its last token
            flat_index.extend(range(end, end + len(row)))
            tokens.extend(encoded[request][1][1:])
            owner.extend([request] * len(row))
        end += len(row)
    _add_scores(scores, logprobs, flat_index, tokens, owner)


def _add_scores(scores: torch.Tensor, logprobs: torch.Tensor, flat_index: list[int],
                tokens: list[int], owner: list[int]) -> None:
    # Scores stay on the device: no per-batch synchronisation, the host prepares the next batch.
    flat_index, tokens, owner = (torch.tensor(x).to(scores.device)
                                 for x in (flat_index, tokens, owner))
    scores.index_add_(0, owner, logprobs[flat_index, tokens])


@contextmanager
def _scoring_mode(model) -> Iterator:
    """Eval mode and no autograd while scoring; the model's train mode is restored after."""
    was_training = model.training
    try:
        with torch.inference_mode():
            yield model.eval()
    finally:
        model.train(was_training)


def _cache_keyword(model) -> str | None:
    """The forward keyword that takes a key/value cache, if the model's cache is a plain growing
    one whose copy the continuations can extend; None for any other model (full rows)."""
    parameters = inspect.signature(model.forward).parameters
    keyword = next((k for k in ("cache", "past_key_values") if k in parameters), None)
    config = getattr(model, "config", None)
    if (keyword is None or "position_ids" not in parameters or config is None
            or getattr(config, "is_encoder_decoder", False)):
        return None
    try:
        cache = DynamicCache(config=config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    layers = cache.layers or [cache.layer_class_to_replicate()]
    return keyword if all(type(layer) is DynamicLayer for layer in layers) else None


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


def _kept_logprobs(model, input_ids, attention_mask, keep, *, n_kept: int,
                   **forward) -> torch.Tensor:
    """float32 log-softmax at the positions marked in ``keep``, flattened row by row;
    ``forward``: further keywords of the model's forward (no cache unless they ask for one)."""
    forward = {"use_cache": False, **forward}
    if _accepts_logits_to_keep(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                       **forward).logits
        if logits.dim() != 2 or logits.shape[0] != n_kept:
            raise RuntimeError(f"{type(model).__name__} does not honour a boolean logits_to_keep "
                               f"mask (got logits of shape {tuple(logits.shape)})")
    else:  # e.g. a wrapper whose forward hides its keywords: compute all logits, then select
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward).logits[keep]
    return torch.log_softmax(logits.float(), dim=-1)


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters
