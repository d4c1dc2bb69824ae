"""Training texts as token batches: which tokens are scored (the answer, or all), seeded
shuffling, padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mansu.data import Split
from mansu.unlearn.checks import require

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels (-100 where not scored)




LOSS_TOKENS = ("answer", "all")


@dataclass(frozen=True)
class Encoded:
    """One training text: its token ids and the first position whose token is scored (1 = every
    next token; later when only the answer is)."""

    ids: tuple[int, ...]
    first_scored: int = 1


def encode_texts(tokenizer, texts: Sequence[str], *, answer_starts: Sequence[int] | None = None,
                 max_length: int = 512) -> list[Encoded]:
    """Tokenize ``texts`` (truncated to ``max_length`` tokens). With ``answer_starts`` (the
    character each answer begins at) only tokens that end past it are scored: the answer, not
    the question or shared prefix. A text with nothing left to score (fewer than two tokens, or
    an answer cut off by truncation) is left out."""
    if answer_starts is None:
        rows = tokenizer(list(texts))["input_ids"]
        return [Encoded(tuple(ids[:max_length])) for ids in rows if len(ids) > 1]
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("loss_tokens=answer needs a fast tokenizer (character offsets); "
                         "use loss_tokens=all")
    batch = tokenizer(list(texts), return_offsets_mapping=True)
    encoded = []
    for ids, offsets, start in zip(batch["input_ids"], batch["offset_mapping"], answer_starts):
        ids = ids[:max_length]
        first = next((i for i, (_, end) in enumerate(offsets[:len(ids)]) if end > start), None)
        if first is not None and len(ids) > 1:
            encoded.append(Encoded(tuple(ids), max(first, 1)))
    return encoded


def scored_answer_starts(split: Split, loss_tokens: str) -> list[int] | None:
    """What ``encode_texts`` needs for a method's ``loss_tokens``: the split's answer starts for
    ``answer`` (None for a raw-text corpus, whose every token is answer), None for ``all``."""
    require(loss_tokens in LOSS_TOKENS,
            f"loss_tokens must be one of {LOSS_TOKENS}, got {loss_tokens!r}")
    return split.answer_starts if loss_tokens == "answer" else None


def text_batches(tokenizer, texts: Sequence[str], *, batch_size: int, seed: int, device,
                 max_length: int = 512, answer_starts: Sequence[int] | None = None
                 ) -> Iterator[Batch]:
    """Endless batches of `texts`: each pass over the corpus is a fresh seeded permutation, cut
    into batches of `batch_size` (the last one of a pass may be smaller). Texts are tokenized
    once (``encode_texts``: truncated, answer-only labels when ``answer_starts`` is given),
    right-padded to the longest text of the batch."""
    encoded = encode_texts(tokenizer, texts, answer_starts=answer_starts, max_length=max_length)
    return encoded_batches(encoded, batch_size=batch_size, seed=seed, device=device,
                           pad_id=_pad_id(tokenizer))


def encoded_batches(encoded: Sequence[Encoded], *, batch_size: int, seed: int, device,
                    pad_id: int = 0) -> Iterator[Batch]:
    """``text_batches`` of texts already encoded."""
    if not encoded:
        raise ValueError("no text with a token to score to make batches from")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield {k: v.to(device) for k, v in collate_encoded(
                [encoded[i] for i in order[start:start + batch_size]], pad_id).items()}


def split_batches(tokenizer, split: Split, *, loss_tokens: str, batch_size: int, seed: int,
                  device, max_length: int = 512) -> Iterator[Batch]:
    """``text_batches`` of a split's corpus, scoring what ``loss_tokens`` says."""
    return text_batches(tokenizer, split.corpus, batch_size=batch_size, seed=seed, device=device,
                        max_length=max_length,
                        answer_starts=scored_answer_starts(split, loss_tokens))


def collate(sequences: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Right-pad token lists into a batch; padding is masked out of attention and labels."""
    return collate_encoded([Encoded(tuple(s)) for s in sequences], pad_id)


def collate_encoded(rows: Sequence[Encoded], pad_id: int) -> Batch:
    """Right-pad encoded texts into a batch; padding and each text's unscored prefix are masked
    out of the labels (-100), padding out of attention (labels are shifted by the loss)."""
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, r in enumerate(rows):
        ids = torch.tensor(r.ids, dtype=torch.long)
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = ids
        if r.first_scored > 1:  # position 0 is never a target: no mask needed for it
            labels[row, :r.first_scored] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_id(tokenizer) -> int:
    # Llama-style tokenizers have no pad token; the id is irrelevant since padding is masked.
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


