"""The metric M of an item, computed on token rows built from the items, and the counterfactual inputs.

M (higher = the model knows the item better):
- ``letter``: logit(correct letter) - mean logit(other letters) at the answer position, the prompt
  being ``mansu.evaluate.mcq``'s ("{question}\\nA. ..\\nAnswer:", letters " A".." D").
- ``cloze``: log p(correct continuation) - mean log p(other continuations), each continuation's
  log-likelihood summed over its tokens exactly as ``mansu.evaluate.mcq`` scores it (context =
  question, continuation = " " + choice, lm-eval tokenisation). It is the letter metric's analogue
  with the option's own likelihood in place of the letter's logit, and the quantity whose sign
  decides the cloze prediction. It costs one sequence per choice; a first-token-only shortcut
  would be one sequence per question but is blind to options that share their first token, so
  the exact form is used.
- ``corpus`` (items are strings): -mean NLL of the text's tokens.

The ``stem_swap`` counterfactual x~ is the same token sequence with the question stem's tokens
(every non-special token of the context that starts inside the question; for corpus text, the
first half of its tokens) replaced by a neutral stem repeated or cut to exactly that many tokens,
so positions align by construction and no prompt needs a fallback. M's targets stay the clean
item's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mansu.data import MCQ
from mansu.evaluate.mcq import encode_pairs, mcq_requests

SCORINGS = ("cloze", "letter", "corpus")
NEUTRAL_STEM = ("Here is a plain sentence about nothing in particular, written only to fill the "
                "space that a question would take, and it goes on in the same way for a while.")


@dataclass
class _Row:
    clean: list[int]
    corrupt: list[int] | None
    item: int
    positions: list[int]  # where the logits are read
    tokens: list[int]  # which vocabulary entry is read there
    weights: list[float]  # its weight in M


def build_rows(tokenizer, items: Sequence, scoring: str, neutral: list[int] | None) -> list[_Row]:
    if scoring == "corpus":
        return [_corpus_row(tokenizer, text, i, neutral) for i, text in enumerate(items)]
    rows = []
    for i, question in enumerate(items):
        if not isinstance(question, MCQ):
            raise TypeError(f"{scoring} scoring needs MCQ items, got {type(question).__name__}")
        context, continuations = mcq_requests(question, scoring)
        encoded = encode_pairs(tokenizer, [(context, cont) for cont in continuations])
        context_ids = encoded[0][0]
        stem = _stem_positions(tokenizer, context, context_ids, len(question.question))
        n = len(continuations)
        weights = [1.0 if c == question.answer else -1.0 / (n - 1) for c in range(n)]
        if scoring == "letter":
            if any(len(cont) != 1 for _, cont in encoded):
                raise ValueError("letter scoring reads the letters' logits, so ' A'..' D' must be "
                                 f"single tokens; this tokenizer splits {continuations}")
            clean = list(context_ids)
            rows.append(_Row(clean, _swap(clean, stem, neutral), i, [len(clean) - 1] * n,
                             [cont[0] for _, cont in encoded], weights))
            continue
        for (ctx, cont), weight in zip(encoded, weights):
            clean = (ctx + cont)[:-1]
            positions = list(range(len(ctx) - 1, len(ctx) - 1 + len(cont)))
            rows.append(_Row(clean, _swap(clean, stem, neutral), i, positions, list(cont),
                             [weight] * len(cont)))
    return rows


def _corpus_row(tokenizer, text: str, item: int, neutral: list[int] | None) -> _Row:
    if not isinstance(text, str):
        raise TypeError(f"corpus scoring needs text items, got {type(text).__name__}")
    encoding = tokenizer(text, return_special_tokens_mask=True)
    ids = encoding["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"corpus text {text!r} has fewer than two tokens: nothing to predict")
    content = [p for p, special in enumerate(encoding["special_tokens_mask"]) if not special]
    stem = content[: math.ceil(len(content) / 2)]
    n = len(ids) - 1
    return _Row(ids[:-1], _swap(ids[:-1], stem, neutral), item, list(range(n)), ids[1:],
                [1.0 / n] * n)


def _stem_positions(tokenizer, context: str, context_ids: list[int], stem_chars: int) -> list[int]:
    """Positions of the non-special tokens of ``context_ids`` that start inside its first
    ``stem_chars`` characters (the question), using the tokenizer's character offsets."""
    for add_special in (True, False):
        encoding = tokenizer(context, add_special_tokens=add_special, return_offsets_mapping=True,
                             return_special_tokens_mask=True)
        if encoding["input_ids"] == list(context_ids):
            break
    else:
        raise ValueError("cannot locate the question's tokens: the tokenizer encodes the prompt "
                         "differently with offsets than lm-eval's tokenisation does")
    return [p for p, ((start, _), special) in enumerate(
        zip(encoding["offset_mapping"], encoding["special_tokens_mask"]))
        if not special and start < stem_chars]


def _swap(clean: list[int], stem: list[int], neutral: list[int] | None) -> list[int] | None:
    if neutral is None:
        return None
    if not stem:
        raise ValueError("stem_swap found no question tokens to replace in this prompt; use "
                         "counterfactual='mean' for it")
    corrupt = list(clean)
    for k, position in enumerate(stem):
        corrupt[position] = neutral[k % len(neutral)]
    return corrupt


@dataclass
class Batch:
    clean: Tensor  # [B, T]
    corrupt: Tensor | None
    mask: Tensor  # [B, T] attention mask
    keep: Tensor  # [B, T] bool: positions whose logits M reads
    items: Tensor  # [B] item of each row
    entry_row: Tensor  # [E] one entry per (row, position, token) read by M
    entry_logit: Tensor  # [E] its row in the kept logits
    entry_tok: Tensor
    entry_weight: Tensor


def iter_batches(rows: list[_Row], batch_size: int, pad_id: int, device) -> Iterator[Batch]:
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r.clean) for r in chunk)
        clean = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        corrupt = clean.clone() if chunk[0].corrupt is not None else None
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        keep = torch.zeros((len(chunk), width), dtype=torch.bool)
        entry_row, entry_pos, entry_tok, entry_weight = [], [], [], []
        for b, row in enumerate(chunk):
            clean[b, : len(row.clean)] = torch.tensor(row.clean)
            if corrupt is not None:
                corrupt[b, : len(row.corrupt)] = torch.tensor(row.corrupt)
            mask[b, : len(row.clean)] = 1
            keep[b, row.positions] = True
            entry_row += [b] * len(row.positions)
            entry_pos += row.positions
            entry_tok += row.tokens
            entry_weight += row.weights
        # The kept logits come flattened row-major: position (b, t) is entry cumsum(keep) - 1.
        kept_index = keep.flatten().cumsum(0).view_as(keep) - 1
        entry_logit = kept_index[torch.tensor(entry_row), torch.tensor(entry_pos)]
        yield Batch(
            clean=clean.to(device), corrupt=None if corrupt is None else corrupt.to(device),
            mask=mask.to(device), keep=keep.to(device), items=torch.tensor([r.item for r in chunk]),
            entry_row=torch.tensor(entry_row, device=device), entry_logit=entry_logit.to(device),
            entry_tok=torch.tensor(entry_tok, device=device),
            entry_weight=torch.tensor(entry_weight, dtype=torch.float32, device=device))


def row_metric(logits: Tensor, batch: Batch, scoring: str) -> Tensor:
    """[B] float32: each row's contribution to its item's M, from the kept logits [K, V]."""
    read = logits[batch.entry_logit].float()
    if scoring != "letter":
        read = read.log_softmax(-1)
    values = read.gather(1, batch.entry_tok[:, None])[:, 0] * batch.entry_weight
    rows = batch.clean.shape[0]
    return torch.zeros(rows, device=logits.device).index_add(0, batch.entry_row, values)



def kept_logits(model: nn.Module, embeds: Tensor, batch: Batch) -> Tensor:
    """Logits [K, V] at the positions M reads only (the vocabulary projection is the largest
    activation of a forward pass)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(inputs_embeds=embeds, attention_mask=batch.mask, logits_to_keep=batch.keep,
                     use_cache=False).logits
    return model(inputs_embeds=embeds, attention_mask=batch.mask, use_cache=False).logits[batch.keep]



def counterfactual_rows(tokenizer, items: Sequence, scoring: str, counterfactual: str | None,
                        neutral_stem: str = NEUTRAL_STEM) -> list[_Row]:
    """The token rows of ``items``: with x~'s tokens for ``stem_swap`` (``neutral_stem`` in the
    question's place), clean only otherwise (``mean`` patches activations, not tokens)."""
    neutral = neutral_ids(tokenizer, neutral_stem) if counterfactual == "stem_swap" else None
    return build_rows(tokenizer, items, scoring, neutral)


def neutral_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the neutral stem encodes to no tokens")
    return ids


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0

