"""Negative preference optimisation (NPO, Zhang et al. 2024): minimise
−(2/β)·mean log σ(−β·(log π_θ(y|x) − log π_ref(y|x))) on the forget corpus, sequence-summed
log-probs, π_ref a frozen copy of θ0, plus α·R(retain) when retain_loss is ``nll`` (the
reference's default ``npo_grad_diff``) or ``kl`` (``npo_KL``); ``none`` is plain NPO.
Reference: licong-lin/negative-preference-optimization (β = 0.1, lr 1e-5, weight decay 0.01)."""

from __future__ import annotations

from typing import Literal

import torch

from mansu.unlearn.checks import UnlearnResult, require
from mansu.unlearn.likelihood import retain_term, sequence_logprobs
from mansu.unlearn.losses import npo_loss
from mansu.unlearn.reference import frozen_copy
from mansu.unlearn.scaffold import Training, baseline


@baseline("npo")
def unlearn(training: Training, *, beta: float = 0.1,
            retain_loss: Literal["none", "nll", "kl"] = "nll", alpha: float = 1.0
            ) -> UnlearnResult:
    require(beta > 0, f"npo: beta must be > 0, got {beta}")
    require(retain_loss in ("none", "nll", "kl"),
            f"npo: retain_loss must be 'none', 'nll' or 'kl', got {retain_loss!r}")
    require(alpha >= 0, f"npo: alpha must be >= 0, got {alpha}")
    require(retain_loss == "none" or len(training.retain.corpus) > 0,
            f"npo: retain_loss={retain_loss!r} needs a retain corpus, and it is empty")
    model = training.model
    reference = frozen_copy(model)

    def loss(forget, retain):
        with torch.no_grad():
            logp_ref = sequence_logprobs(reference, forget)
        value = npo_loss(sequence_logprobs(model, forget), logp_ref, beta)
        if retain is not None:
            value = value + alpha * retain_term(retain_loss, model, retain, reference)
        return value

    return training.train(loss, retain=retain_loss != "none")
