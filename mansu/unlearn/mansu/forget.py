"""MANSU's forget objective (docs/method.md §4.4) and the forget gain its floor is chosen by.

``forget_loss``: ``npo`` (β = 0.1; the frozen reference enters only through log π_ref(y) of each
forget text, computed once on θ0 instead of keeping a second model), ``ga``, or ``logit`` (mean
over scored tokens of relu(z_y − max_{v≠y} z_v): the true token is pushed just below the best other
one and then left alone, so it cannot run away as gradient ascent does). Scored tokens are the
answers with ``loss_tokens: answer`` (default, as TOFU masks the question), every token with
``all``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mansu.attribution.nodes import eval_mode
from mansu.data import Split
from mansu.unlearn.batches import Batch, Encoded, collate_encoded, encode_texts, scored_answer_starts
from mansu.unlearn.likelihood import forward_logits, mean_nll, sequence_logprobs
from mansu.unlearn.losses import ga_loss, npo_loss
from mansu.unlearn.mansu.mask import MaskedWeight, masked_gradient
from mansu.unlearn.mansu.retain import token_nll_sum

FORGET_LOSSES = ("npo", "ga", "logit")


def logit_margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """mean over scored next tokens of relu(z_y − max_{v≠y} z_v), in fp32."""
    z = logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != -100
    safe = targets.clamp_min(0).unsqueeze(-1)
    true_logit = z.gather(-1, safe).squeeze(-1)
    best_other = z.scatter(-1, safe, float("-inf")).amax(-1)
    margins = torch.relu(true_logit - best_other) * scored
    return margins.sum() / scored.sum()


def forget_encoded(tokenizer, forget: Split, loss_tokens: str, max_length: int) -> list[Encoded]:
    return encode_texts(tokenizer, forget.corpus, max_length=max_length,
                        answer_starts=scored_answer_starts(forget, loss_tokens))


def forget_objective(kind: str, model, encoded: Sequence[Encoded], device, *, beta: float,
                     batch_size: int) -> Callable[[Batch], Tensor]:
    if kind == "ga":
        return lambda batch: ga_loss(mean_nll(model, batch))
    if kind == "logit":
        return lambda batch: logit_margin_loss(forward_logits(model, batch), batch["labels"])
    reference = _reference_logprobs(model, encoded, batch_size, device)

    def npo(batch: Batch) -> Tensor:
        keys = row_keys(batch)
        missing = [k for k in keys if k not in reference]
        if missing:
            raise RuntimeError("a forget batch holds a text whose θ0 log-likelihood was not "
                               "precomputed: its tokenisation differs from the reference's")
        logp_ref = torch.tensor([reference[k] for k in keys], device=batch["input_ids"].device)
        return npo_loss(sequence_logprobs(model, batch), logp_ref, beta)

    return npo


def forget_gradient(model, encoded: Sequence[Encoded], masked: Sequence[MaskedWeight], device,
                    batch_size: int) -> Tensor:
    """g_f: the gradient of the forget NLL per scored token on the masked entries, at the
    model's current weights (θ0 when called before training)."""
    total = torch.zeros(sum(m.index.numel() for m in masked), device=masked[0].index.device)
    tokens = 0
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate_encoded(encoded[start:start + batch_size], 0).items()}
            nll, n = token_nll_sum(model, batch)
            total += masked_gradient(masked, nll)
            tokens += n
    return total / tokens


def row_keys(batch: Batch) -> list[tuple]:
    """A text's identity in a batch: its tokens and which of them are scored."""
    return [(tuple(ids[mask.bool()].tolist()), tuple(labels[mask.bool()].tolist()))
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"],
                                         batch["attention_mask"])]


@torch.no_grad()
def _reference_logprobs(model, encoded: Sequence[Encoded], batch_size: int, device) -> dict:
    """log π_θ0(y) of every forget text's scored tokens (NPO's frozen reference)."""
    table = {}
    with eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate_encoded(encoded[start:start + batch_size], 0).items()}
            table.update(zip(row_keys(batch), sequence_logprobs(model, batch).tolist()))
    return table
