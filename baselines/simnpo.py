"""SimNPO (Fan et al. 2024): reference-free, length-normalised NPO,
−(2/β)·mean log σ(−(β/|y|)·log π_θ(y|x) − γ) on the forget corpus, plus α·NLL(retain) when
retain_loss is ``nll`` (the reference's ``simnpo_grad_diff``); ``none`` is plain SimNPO.
Reference: OPTML-Group/Unlearn-Simple (TOFU: β = 2.5, γ = 0, lr 1e-5, weight decay 0.01)."""

from __future__ import annotations

from typing import Literal

from mansu.unlearn.checks import UnlearnResult, require
from mansu.unlearn.likelihood import mean_nll, scored_token_counts, sequence_logprobs
from mansu.unlearn.losses import simnpo_loss
from mansu.unlearn.scaffold import Training, baseline


@baseline("simnpo")
def unlearn(training: Training, *, beta: float = 2.5, gamma: float = 0.0,
            retain_loss: Literal["none", "nll"] = "nll", alpha: float = 1.0) -> UnlearnResult:
    require(beta > 0, f"simnpo: beta must be > 0, got {beta}")
    require(retain_loss in ("none", "nll"),
            f"simnpo: retain_loss must be 'none' or 'nll', got {retain_loss!r}")
    require(alpha >= 0, f"simnpo: alpha must be >= 0, got {alpha}")
    require(retain_loss == "none" or len(training.retain.corpus) > 0,
            "simnpo: retain_loss='nll' needs a retain corpus, and it is empty")
    model = training.model

    def loss(forget, retain):
        value = simnpo_loss(sequence_logprobs(model, forget), scored_token_counts(forget), beta,
                            gamma)
        if retain is not None:
            value = value + alpha * mean_nll(model, retain)
        return value

    return training.train(loss, retain=retain_loss == "nll")
