"""Log-likelihoods of a batch under a model: per-sequence log-probs, the mean NLL, the retain terms."""

from __future__ import annotations

import torch
from torch import nn

from mansu.unlearn.batches import Batch
from mansu.unlearn.losses import kl_retain


def _token_nll(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of each next token [B, T-1] (0 where unscored) and the scored mask.
    Logits are upcast to fp32 as Hugging Face's own causal-LM loss does."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                      ignore_index=-100, reduction="none")
    return nll, targets != -100


def sequence_logprobs(model, batch: Batch) -> torch.Tensor:
    """[B] log π(y) of each sequence: its token log-probs summed (NPO's sequence likelihood)."""
    nll, _ = _token_nll(model, batch)
    return -nll.sum(dim=1)


def scored_token_counts(batch: Batch) -> torch.Tensor:
    """[B] how many tokens of each sequence are scored (|y|, SimNPO's length normalisation)."""
    return (batch["labels"][:, 1:] != -100).sum(dim=1)


def mean_nll(model, batch: Batch) -> torch.Tensor:
    """Mean NLL over all scored tokens of the batch (= Hugging Face's ``outputs.loss``)."""
    nll, scored = _token_nll(model, batch)
    return nll.sum() / scored.sum()


def forward_logits(model, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def retain_term(kind: str, model, batch: Batch, reference: nn.Module | None = None
                ) -> torch.Tensor:
    """The retain regulariser the references offer: ``nll`` = NLL(retain) (TOFU's grad_diff),
    ``kl`` = KL(π_ref ‖ π_θ) over the retain tokens (TOFU's KL; needs the frozen reference)."""
    if kind == "nll":
        return mean_nll(model, batch)
    if kind == "kl":
        with torch.no_grad():
            ref_logits = forward_logits(reference, batch)
        return kl_retain(ref_logits, forward_logits(model, batch), batch["attention_mask"])
    raise ValueError(f"unknown retain loss {kind!r}; expected 'nll' or 'kl'")


